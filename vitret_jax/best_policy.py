"""The keep-best preservation policy of checkpoint.Checkpointer: the steps
of highest metric, as each step's evaluation recorded it beside its files."""
import dataclasses
import json
import os

EVAL_METRICS = "vitret_eval.json"


@dataclasses.dataclass
class BestByEvalFile:
  """Orbax preservation policy: the `n` steps of highest `metric` in their
  vitret_eval.json (steps without one do not compete)."""
  directory: str
  metric: str
  n: int

  def _score(self, step):
    try:
      with open(os.path.join(self.directory, str(step), EVAL_METRICS)) as f:
        value = json.load(f).get(self.metric)
      return float(value) if value is not None else None
    except (OSError, ValueError, TypeError):
      return None

  def should_preserve(self, checkpoints, *, context):
    del context
    scores = {c.step: self._score(c.step) for c in checkpoints}
    ranked = sorted((s for s, v in scores.items() if v is not None),
                    key=lambda s: (scores[s], s), reverse=True)[:self.n]
    return [c.step in ranked for c in checkpoints]
