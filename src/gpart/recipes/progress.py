"""What `gpart train` shows while it runs, and the log it keeps in the run directory.

The Trainer's own progress callback writes every log dict between redraws of its bar, so a captured
console (a file, a pipe, a notebook cell) mixes the two. Here the bar alone is drawn (on stderr,
with the latest losses beside it) and every log dict goes, one JSON object a line, to LOG_FILE.
"""
from __future__ import annotations

import json
from pathlib import Path

LOG_FILE = "train_log.jsonl"


def use_run_progress(trainer, out: Path, *, quiet: bool) -> None:
    """Swap the Trainer's console callbacks (bar + printed dicts, or printed dicts with --quiet) for ours."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_callback_class()(out / LOG_FILE, bar=not quiet))


def _callback_class():
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class RunProgress(TrainerCallback):
        def __init__(self, log_path: Path, *, bar: bool):
            self.log_path, self.show_bar, self.bar = log_path, bar, None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero and state.global_step:
                # a resume: the lines after this one may repeat steps the stopped launch logged past its checkpoint
                with self.log_path.open("a") as f:
                    f.write(json.dumps({"step": state.global_step, "resumed": True}) + "\n")
            if state.is_world_process_zero and self.show_bar:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            with self.log_path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
            shown = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss") if isinstance(logs.get(k), (int, float))}
            if self.bar is not None and shown:
                self.bar.set_postfix(shown, refresh=False)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return RunProgress
