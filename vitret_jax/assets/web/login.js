// The sign-in page of vitret_jax/serve.py (served when a token is set):
// /login redirects back here with #wrong after a wrong token, #wait when
// this address sent too many wrong ones.
"use strict";
const messages = {
  "#wrong": "That is not the token: try again.",
  "#wait": "Too many wrong tokens from this address: wait a minute, then try again.",
};
document.getElementById("error").textContent = messages[window.location.hash] || "";
document.getElementById("token").focus();
