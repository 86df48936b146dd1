"""One RLHF round on disk: rejection sampling + SFT (or SFT alone), Ghost Attention, PPO and safety context
distillation, those present in that order (policy/rounds.py says why), then the output checkpoint with its
lineage. No Django: workers/rounds.py gives it paths, prompts and a
`report` callback and records what comes back.

The round's folder (out_dir):

    rejection_sampling/   policy.rejection_sampling's folder: chunks of scored samples, pool.jsonl,
                          policy/ (the SFT-on-the-pool result) and result.json once the stage is done
    sft/                  SFT alone on the lineage's pool: policy/ and result.json
    gatt/                 policy.round_stages' Ghost Attention: sampled dialogues in chunks, train.jsonl,
                          policy/ and result.json
    ppo/                  policy.ppo's folder: state.pt every `checkpoint_every` iterations, metrics.jsonl
    context_distillation/ policy.round_stages' safety context distillation: samples.jsonl (both answers and
                          their safety scores), train.jsonl, policy/ and result.json
    evaluation/           the new checkpoint against its parent on the held-out prompts (policy.round_eval):
                          answers.jsonl and result.json
    checkpoint/           the output, Meta format + tokenizer.model + training.json (config, lineage, metrics)
    result.json           written last: the round is complete

Every file there is written atomically, so a worker killed at any moment leaves complete stages, complete
sampling chunks and the last PPO state; running again with the same inputs resumes from them and ends
as an uninterrupted run would (each module checks that its inputs are the same as before).

`report(stage, fraction, message, metrics)` is called after every chunk, SFT step and PPO iteration;
when it returns False (the round was cancelled) the run stops there with RoundCancelled.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policy.round_config import RoundConfig
from policy.reward import Prompt

Report = Callable[[str, float, str, Mapping[str, Any] | None], bool]
CURVE_KEYS = ("iteration", "reward_raw", "reward_helpful", "reward_safety", "kl", "entropy", "clipfrac", "value_loss",
              "pg_loss", "approx_kl", "response_length", "eval_reward")
REPORT_EVERY_S = 1.0  # at most one progress write per second, plus every stage boundary


class RoundCancelled(Exception):
    """The round was cancelled; the run stopped between two steps."""


@dataclass
class RoundSpec:
    policy_dir: str  # Meta-format checkpoint the round starts from
    tokenizer_path: str  # the policy's tokenizer (the reward models' too: checked at launch)
    helpful_rm_dir: str  # reward-model folders (rewards.model.save_reward_model)
    safety_rm_dir: str
    prompts: list[Prompt]  # training prompts
    eval_prompts: list[Prompt]  # held out: PPO's early stopping
    stages: list[str]  # ordered subset of rejection_sampling, sft, gatt, ppo, context_distillation
    config: RoundConfig
    round_number: int = 1  # this round's number in its lineage (recorded in the pool)
    pool_in: str | None = None  # the lineage's pool of best samples so far
    lineage: dict[str, Any] = field(default_factory=dict)  # written into the output's training.json
    device: str = "auto"


@dataclass
class RoundResult:
    checkpoint_dir: str
    metrics: dict[str, Any]


def reward_model_dir(path: str | Path) -> Path:
    """A reward-model run's artifact: the model folder itself, or a training folder holding model/."""
    path = Path(path)
    return path if (path / "config.json").is_file() else path / "model"


def run_round(spec: RoundSpec, out_dir: str | Path, report: Report) -> RoundResult:
    import torch

    from policy.checkpoints import _atomic_file, load_checkpoint
    from policy.sft import resolve_device, save_checkpoint
    from policy.tokenizer import Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "result.json").is_file():
        saved = json.loads((out / "result.json").read_text())
        return RoundResult(saved["checkpoint_dir"], saved["metrics"])

    device = resolve_device(spec.device)
    tokenizer = Tokenizer(spec.tokenizer_path)
    policy = load_checkpoint(spec.policy_dir, device=device, dtype=torch.float32)
    reward_fn = _reward_function(spec, tokenizer, device)
    cfg = spec.config
    tracker = _Tracker(spec.stages, report)
    metrics: dict[str, Any] = {"stages": list(spec.stages), "round_number": spec.round_number,
                               "prompts": len(spec.prompts), "eval_prompts": len(spec.eval_prompts)}
    started = time.perf_counter()

    if "rejection_sampling" in spec.stages:
        from policy.rejection_sampling import rejection_sampling_round

        tracker.begin("rejection_sampling", "Sampling K responses per prompt.")
        result = rejection_sampling_round(
            policy, tokenizer, spec.prompts, reward_fn, cfg.rejection_sampling_config(spec.round_number, spec.device),
            out / "rejection_sampling", pool_in=spec.pool_in, progress=tracker.rejection_sampling,
        )  # fmt: skip
        if not all(math.isfinite(result.metrics[k]) for k in ("reward_mean", "reward_best_mean")):
            # A NaN score makes "the best of K" meaningless; the chunks on disk show which samples had it.
            raise ValueError(f"the reward models returned non-finite scores during rejection sampling (mean "
                             f"{result.metrics['reward_mean']}); see {out / 'rejection_sampling' / 'samples'}")
        metrics["rejection_sampling"] = result.metrics
        metrics["pool_path"] = str(result.pool_path)
        tracker.end("rejection_sampling", {"rejection_sampling": result.metrics, "pool_path": str(result.pool_path)})
    elif "sft" in spec.stages:
        metrics["sft"] = _sft_on_pool(policy, tokenizer, spec, out / "sft", tracker)
        metrics["pool_path"] = spec.pool_in
        tracker.end("sft", {"sft": metrics["sft"], "pool_path": spec.pool_in})

    if "gatt" in spec.stages:
        from policy.round_stages import gatt_stage

        tracker.begin("gatt", f"Ghost Attention: {cfg.gatt.dialogues} dialogues of {cfg.gatt.turns} turns.")
        metrics["gatt"] = gatt_stage(policy, tokenizer, spec.prompts, cfg, out / "gatt", device=spec.device,
                                     progress=tracker.progress_of("gatt"))
        tracker.end("gatt", {"gatt": metrics["gatt"]})

    if "ppo" in spec.stages:
        from policy.ppo import ppo_train

        ppo_dir = out / "ppo"
        resumed_from = _ppo_iterations_done(ppo_dir)
        tracker.begin("ppo", f"PPO: resuming after iteration {resumed_from}." if resumed_from else "PPO.")
        tracker.curve = _read_curve(ppo_dir)
        result = ppo_train(policy, tokenizer, spec.prompts, reward_fn, cfg.ppo_config(), ppo_dir,
                           eval_prompts=spec.eval_prompts, progress=tracker.ppo, resume=True)
        metrics["ppo"] = {"iterations": result.iterations, "stopped_early": result.stopped_early,
                          "best_iteration": result.best_iteration, "resumed_from_iteration": resumed_from,
                          "curve": [_curve_point(m) for m in result.metrics]}
        tracker.end("ppo", {"ppo": metrics["ppo"]})

    if "context_distillation" in spec.stages:
        from policy.round_stages import context_distillation_stage

        tracker.begin("context_distillation", "Safety context distillation on the adversarial prompts.")
        safety = getattr(reward_fn, "safety", None) or (lambda p, r, t: reward_fn(p, r, t)[1])
        metrics["context_distillation"] = context_distillation_stage(
            policy, tokenizer, spec.prompts, safety, cfg, out / "context_distillation", device=spec.device,
            progress=tracker.progress_of("context_distillation"))
        tracker.end("context_distillation", {"context_distillation": metrics["context_distillation"]})

    if cfg.evaluation.prompts and spec.eval_prompts:
        from policy.round_eval import evaluate_against_parent

        n = min(len(spec.eval_prompts), cfg.evaluation.prompts)
        tracker.begin("evaluation", f"Evaluation: the new checkpoint and its parent answer {n} held-out prompts.")
        parent = load_checkpoint(spec.policy_dir, device=device, dtype=torch.float32).eval()
        policy.eval()
        metrics["evaluation"] = evaluate_against_parent(policy, parent, tokenizer, spec.eval_prompts, reward_fn,
                                                        cfg.evaluation, out / "evaluation", seed=cfg.seed + 1)
        del parent
        tracker.end("evaluation", {"evaluation": metrics["evaluation"]})

    metrics["seconds"] = time.perf_counter() - started
    tracker.begin("output", "Writing the output checkpoint.")
    tokenizer_copy = out / "tokenizer.model"
    with _atomic_file(tokenizer_copy) as tmp:
        tmp.write_bytes(Path(spec.tokenizer_path).read_bytes())
    summary = {k: v for k, v in metrics.items() if k != "ppo"}
    if "ppo" in metrics:
        summary["ppo"] = {k: v for k, v in metrics["ppo"].items() if k != "curve"}
    # The data the stages made and trained on, by path and content hash (rejection sampling's is its pool).
    made = {stage: {k: metrics[stage][k] for k in ("train_path", "train_sha256", "samples", "kept", "dropped")
                    if k in metrics[stage]} for stage in ("gatt", "context_distillation") if stage in metrics}
    lineage = {**spec.lineage, "training_data": made} if made else spec.lineage
    checkpoint_dir = save_checkpoint(policy, out / "checkpoint", tokenizer_path=tokenizer_copy, config=cfg,
                                     extra={"algorithm": "rlhf_round", "stages": spec.stages,
                                            "lineage": lineage, "metrics": summary})
    with _atomic_file(out / "result.json") as tmp:
        tmp.write_text(json.dumps({"checkpoint_dir": str(checkpoint_dir), "metrics": metrics}, indent=2))
    return RoundResult(str(checkpoint_dir), metrics)


def _reward_function(spec: RoundSpec, tokenizer: Any, device: Any) -> Any:
    from policy.reward import TwinRewardModels
    from rewards.model import load_reward_model

    helpful = load_reward_model(reward_model_dir(spec.helpful_rm_dir), device=device).eval()
    safety = load_reward_model(reward_model_dir(spec.safety_rm_dir), device=device).eval()
    return TwinRewardModels.from_models(helpful, safety, tokenizer)


def _sft_on_pool(policy: Any, tokenizer: Any, spec: RoundSpec, out: Path, tracker: _Tracker) -> dict[str, Any]:
    """The sft stage without rejection sampling: fine-tune on the lineage's pool of best samples."""
    from policy.checkpoints import _atomic_file, load_checkpoint
    from policy.sft import save_checkpoint, sft_train

    if (out / "result.json").is_file():
        finished = load_checkpoint(out / "policy", dtype=policy.output.weight.dtype)
        policy.load_state_dict(finished.state_dict())
        return json.loads((out / "result.json").read_text())["metrics"]
    if not spec.pool_in or not Path(spec.pool_in).is_file():
        raise ValueError("SFT alone needs the lineage's pool of best samples, and there is none")
    tracker.begin("sft", "SFT on the lineage's pool of best samples.")
    pool = [json.loads(line) for line in Path(spec.pool_in).read_text().splitlines() if line.strip()]
    dialogs = [[*e["prompt"]["messages"], {"role": "assistant", "content": e["response"]}] for e in pool]
    metrics = sft_train(policy, tokenizer, dialogs, spec.config.sft_config(spec.device), tracker.sft)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_copy = out / "tokenizer.model"
    with _atomic_file(tokenizer_copy) as tmp:
        tmp.write_bytes(Path(spec.tokenizer_path).read_bytes())
    save_checkpoint(policy, out / "policy", tokenizer_path=tokenizer_copy, config=spec.config.sft_config(spec.device),
                    extra={"algorithm": "sft_on_pool", "pool": spec.pool_in, "metrics": metrics})
    with _atomic_file(out / "result.json") as tmp:
        tmp.write_text(json.dumps({"metrics": metrics}, indent=2))
    return metrics


def _ppo_iterations_done(ppo_dir: Path) -> int:
    """Iterations in the last saved PPO state (metrics.jsonl is written with it)."""
    return len(_read_curve(ppo_dir)) if (ppo_dir / "state.pt").is_file() else 0


def _read_curve(ppo_dir: Path) -> list[dict[str, Any]]:
    path = ppo_dir / "metrics.jsonl"
    if not (ppo_dir / "state.pt").is_file() or not path.is_file():
        return []
    return [_curve_point(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _curve_point(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in CURVE_KEYS if k in m}


class _Tracker:
    """Turns the algorithms' progress callbacks into the round's overall progress, throttled writes of it,
    and cancellation. Each stage present gets an equal share of the bar, in the order they run; rejection
    sampling and its SFT are reported together by policy.rejection_sampling, so they share two."""

    def __init__(self, stages: Sequence[str], report: Report) -> None:
        self.stages = list(stages)
        self.report = report
        self.curve: list[dict[str, Any]] = []
        self.last = 0.0

    def _span(self, stage: str) -> tuple[float, float]:
        n = len(self.stages)
        if stage not in self.stages:
            return 0.999, 0.0  # evaluation, output: after the training stages
        width = 2 / n if stage == "rejection_sampling" else 1 / n
        return self.stages.index(stage) / n, width

    def _send(self, stage: str, fraction: float, message: str, metrics: Mapping[str, Any] | None, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self.last < REPORT_EVERY_S:
            return
        self.last = now
        if not self.report(stage, min(fraction, 0.999), message, metrics):
            raise RoundCancelled(f"cancelled during {stage}")

    def begin(self, stage: str, message: str) -> None:
        self._send(stage, self._span(stage)[0], message, None, force=True)

    def end(self, stage: str, metrics: Mapping[str, Any]) -> None:
        start, width = self._span(stage)
        self._send(stage, start + width, f"{stage} done.", metrics, force=True)

    def rejection_sampling(self, done: int, total: int, m: Mapping[str, float]) -> None:
        # policy.rejection_sampling reports its chunks, then its SFT steps: (done, total) over both.
        start, width = self._span("rejection_sampling")
        if "loss" in m:
            stage, what = "sft", f"SFT on the pool, step loss {m['loss']:.3f}"
        else:
            stage, what = "rejection_sampling", f"{int(m.get('prompts_sampled', 0))} prompts sampled"
        self._send(stage, start + width * done / max(total, 1), f"{what} ({done}/{total}).", None, force=False)

    def progress_of(self, stage: str) -> Callable[[int, int, Mapping[str, float]], None]:
        """The progress callback of a stage that samples its data, then fine-tunes on it (GAtt, context
        distillation): metrics with a loss are SFT steps."""
        start, width = self._span(stage)

        def progress(done: int, total: int, m: Mapping[str, float]) -> None:
            what = f"SFT step loss {m['loss']:.3f}" if "loss" in m else "sampling"
            self._send(stage, start + width * done / max(total, 1), f"{stage}: {what} ({done}/{total}).", None,
                       force=False)

        return progress

    def sft(self, done: int, total: int, m: Mapping[str, float]) -> None:
        start, width = self._span("sft")
        self._send("sft", start + width * done / max(total, 1), f"SFT step {done}/{total}, loss {m['loss']:.3f}.",
                   None, force=False)

    def ppo(self, done: int, total: int, m: Mapping[str, float]) -> None:
        self.curve.append(_curve_point(m))
        start, width = self._span("ppo")
        message = (f"PPO iteration {done}/{total}: reward {m.get('reward_raw', float('nan')):.3f}, "
                   f"KL {m.get('kl', 0.0):.3f}.")
        self._send("ppo", start + width * done / max(total, 1), message,
                   {"ppo": {"curve": self.curve, "iterations": done}}, force=False)
