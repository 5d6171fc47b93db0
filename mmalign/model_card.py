"""Model cards for exports (`mmalign export --card`) and the push to the Hub (`--push-to-hub REPO`).

The card is a README.md with the Hub's YAML header (base_model, library_name, tags) and:
base model and family, the method and its loss with the formula (the loss function's docstring,
mmalign/losses.py), the data, the hyperparameters, the final metrics (the last value of every key
in the run's metrics.jsonl: training and held-out), and the command that reproduces the run
(`mmalign train mmalign_config.yaml`, the run's whole config written beside the card).

The push is `HfApi.create_repo(exist_ok=True)` then `HfApi.upload_folder` of the export, at the
endpoint HF_ENDPOINT names (read at call time), with the token huggingface_hub finds (HF_TOKEN or
`hf auth login`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from mmalign.config import Config, to_dict
from mmalign.hub import is_hub_id

CONFIG_FILE = "mmalign_config.yaml"
NOTATION = ("Notation: log-likelihoods log p(y|x) of the chosen (c) and rejected (r) output under the policy "
            "and the frozen reference; hc = log p_policy(c) - log p_ref(c), hr the same for r, d = hc - hr, "
            "sigma the logistic function. For diffusion and flow models log p is the implicit (ELBO) "
            "log-likelihood -0.5 * mse of the denoising target at a shared timestep and noise.")
METRIC_ORDER = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected")


def final_metrics(metrics_file: Path) -> dict[str, float]:
    """The last logged value of every key of metrics.jsonl (an unreadable line is skipped); {} without the file."""
    last: dict[str, float] = {}
    if not metrics_file.is_file():
        return last
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        last.update({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return last


def loss_description(cfg: Config) -> list[str]:
    """One line per loss: its name, weight and the docstring's first paragraph (paper, formula)."""
    from mmalign.losses import get_loss

    names = cfg.loss.name if isinstance(cfg.loss.name, list) else [cfg.loss.name]
    weights = cfg.loss.weights or [1.0] * len(names)
    lines = []
    for name, weight in zip(names, weights):
        doc = (get_loss(name).fn.__doc__ or "").strip().split("\n\n")[0]
        lines.append(f"- `{name}`{f' (weight {weight:g})' if len(names) > 1 else ''}: " + " ".join(doc.split()))
    return lines


def _hyperparameters(cfg: Config) -> dict[str, Any]:
    t, o, loss = cfg.train, cfg.optim, cfg.loss
    values = {"loss.beta": loss.beta, "optim.name": o.name, "optim.lr": o.lr, "train.batch_size": t.batch_size,
              "train.grad_accum": t.grad_accum, "train.max_steps": t.max_steps, "train.seed": t.seed,
              "model.dtype": cfg.model.dtype}
    if cfg.lora.enabled:
        values.update({"lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha,
                       "lora.target_modules": ", ".join(cfg.lora.target_modules or [])})
    return values


def _header(cfg: Config, library: str) -> str:
    meta: dict[str, Any] = {"library_name": library, "tags": ["mmalign", cfg.modality, *(
        cfg.loss.name if isinstance(cfg.loss.name, list) else [cfg.loss.name])]}
    if is_hub_id(cfg.model.path) and not Path(cfg.model.path).exists():
        meta = {"base_model": cfg.model.path.split("@")[0], **meta}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def render_card(cfg: Config, metrics: dict[str, float], fmt: str, load: str, library: str) -> str:
    """The README.md text (see the module docstring)."""
    data = cfg.data.train if isinstance(cfg.data.train, str) else ", ".join(cfg.data.train)
    online = "online rounds sampled from the policy (`online:` / the family's source in the config)"
    keys = [k for k in METRIC_ORDER if k in metrics] + sorted(k for k in metrics if k not in METRIC_ORDER)
    rows = "\n".join(f"| {k} | {metrics[k]:.6g} |" for k in keys if k != "step")
    hyper = "\n".join(f"| {k} | {v} |" for k, v in _hyperparameters(cfg).items())
    return "\n".join([
        _header(cfg, library),
        f"# {cfg.modality} aligned with {cfg.loss.name if isinstance(cfg.loss.name, str) else ' + '.join(cfg.loss.name)}",
        "", f"Trained with mmalign (preference alignment) and exported as `{fmt}`.", "",
        "## Base model", "", f"- base model: `{cfg.model.path}`", f"- family: `{cfg.modality}`",
        f"- LoRA: {'yes' if cfg.lora.enabled else 'no (full fine-tune)'}", "",
        "## Method and loss", "", *loss_description(cfg), "", NOTATION, "",
        "## Data", "", f"- train: `{data}`" if data else f"- train: {online}",
        *( [f"- held out: `{cfg.data.eval}`"] if cfg.data.eval else []), f"- format: `{cfg.data.format}`", "",
        "## Hyperparameters", "", "| key | value |", "|---|---|", hyper, "",
        "## Final metrics", "", *(["| metric | value |", "|---|---|", rows] if rows else ["(no metrics.jsonl)"]),
        *([f"", f"(step {int(metrics['step'])})"] if "step" in metrics else []), "",
        "## Use", "", "```python", load, "```", "",
        "## Reproduce", "", "```bash", f"mmalign train {CONFIG_FILE}", "```", "",
        f"`{CONFIG_FILE}` (beside this card) is the run's whole config.", ""])


def write_card(folder: Path, cfg: Config, output_dir: Path, fmt: str, load: str, library: str) -> None:
    """README.md and mmalign_config.yaml into the export `folder`."""
    config = to_dict(cfg)
    config.pop("source", None)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    card = render_card(cfg, final_metrics(output_dir / "metrics.jsonl"), fmt, load, library)
    (folder / "README.md").write_text(card)


def push_to_hub(folder: Path, repo: str, private: bool = False, message: str = "") -> str:
    """create_repo (exist_ok) + upload_folder of `folder` to the model repo `repo`; returns the commit URL."""
    from huggingface_hub import HfApi

    from mmalign.errors import ConfigError

    if not is_hub_id(repo) or "@" in repo:
        raise ConfigError(f"--push-to-hub {repo!r}: expected a repo id org/name")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    api.create_repo(repo, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=message or "Upload with mmalign")
    return info.commit_url
