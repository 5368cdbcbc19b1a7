// The sign-in page of vitret_jax/serve.py (served when a token is set):
// /login redirects back here with #wrong after a wrong token.
"use strict";
if (window.location.hash === "#wrong") {
  document.getElementById("error").textContent = "That is not the token: try again.";
}
document.getElementById("token").focus();
