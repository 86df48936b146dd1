"""One PPO iteration (generation + scoring + update): policy.ppo's own breakdown, and TRL's experimental
PPOTrainer on transformers' Llama with the same config, weights, prompts, batch and response length.

Model: Llama 2 architecture, dim 256, 4 layers, 8 heads, 4 KV heads, vocab 32000 (the Llama 2 tokenizer of
../shared/data), random weights, float32. Prompts: the demo world's training prompts in Meta's chat format.
Batch 16 prompts, one response each, mini-batch 4 (4 optimizer steps per iteration), 32 new tokens.
A random policy almost never says EOS, so every response has the full 32 tokens on both sides.

Reward: ours is the product's, the twin reward models (helpfulness and safety, rewards/model.py, same
config as the policy) combined as Llama 2 does; TRL takes one reward model (LlamaForSequenceClassification,
same config), so our scoring does twice TRL's reward-model work. Value model: on both sides a copy of the
backbone with a scalar head.

Columns, seconds per iteration, of the 2-3 iterations run the one of least total (the first warms up):
- generation: sampling the responses;
- scoring: the reward model(s);
- forward + update: log-probs of policy and reference, values, GAE, and the mini-batch steps.

TRL's PPO trainer is trl.trainer.ppo_trainer up to trl 0.28, trl.experimental.ppo from 0.26 to 1.12, and
gone from 1.13 on (the .venv has 1.16); this script loads trl 1.12.0 from a separate folder (--trl-path):

    .venv/bin/pip install --no-deps --target var/trl-1.12.0 trl==1.12.0
    .venv/bin/python -m bench.bench_ppo            # quick: dim 128, 2 layers, batch 8, 16 tokens, 2 iterations
    .venv/bin/python -m bench.bench_ppo --full     # the reported run (also --threads N, --device cuda [--bf16])
    .venv/bin/python -m bench.bench_ppo --size 886m --device cuda --bf16 --skip-trl   # ours alone, larger
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from policy.checkpoints import save_hf
from policy.demo_world import default_world
from policy.model import ModelArgs, Transformer
from policy.ppo import PPOConfig, ppo_train
from policy.reward import Prompt, TwinRewardModels
from policy.tokenizer import Tokenizer
from rewards.model import RewardModel

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"


@dataclass
class Setup:
    args: ModelArgs
    batch: int
    mini_batch: int
    new_tokens: int
    iterations: int


FULL = Setup(ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=32000, multiple_of=32,
                       max_seq_len=512), batch=16, mini_batch=4, new_tokens=32, iterations=3)
QUICK = Setup(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32,
                        max_seq_len=512), batch=8, mini_batch=4, new_tokens=16, iterations=2)
# Larger sizes for a GPU (--size), batch 64 in mini-batches of 8 as the paper's 512 / 64.
SIZES = {
    "160m": Setup(ModelArgs(dim=1024, n_layers=8, n_heads=16, n_kv_heads=8, vocab_size=32000, multiple_of=256,
                            max_seq_len=1024), batch=64, mini_batch=8, new_tokens=128, iterations=3),
    "886m": Setup(ModelArgs(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, vocab_size=32000, multiple_of=256,
                            max_seq_len=1024), batch=64, mini_batch=8, new_tokens=128, iterations=3),
}


def bench_prompts(n: int) -> list[Prompt]:
    world_prompts = default_world().prompts("train")
    step = max(1, len(world_prompts) // n)
    return [Prompt(p.dialog(), is_safety=p.is_adversarial) for p in world_prompts[::step][:n]]


def ours(setup: Setup, tokenizer: Tokenizer, policy: Transformer, reward_models: tuple, prompts: list[Prompt],
         device: str, bf16: bool) -> list[dict[str, float]]:
    reward_fn = TwinRewardModels.from_models(*reward_models, tokenizer, batch_size=setup.batch)
    config = PPOConfig(n_iterations=setup.iterations, batch_size=setup.batch, mini_batch_size=setup.mini_batch,
                       max_new_tokens=setup.new_tokens, checkpoint_every=10_000, eval_every=0, bf16=bf16)
    with tempfile.TemporaryDirectory() as out:
        result = ppo_train(policy.to(device), tokenizer, prompts, reward_fn, config, out)
    return [{"generation": m["time_generation"], "scoring": m["time_scoring"],
             "update": m["time_forward"] + m["time_update"], "length": m["response_length"]} for m in result.metrics]


def trl_ppo(setup: Setup, tokenizer_path: Path, policy: Transformer, prompt_tokens: list[list[int]], trl_path: str,
            device: str, bf16: bool) -> tuple[list[dict[str, float]], str]:
    """TRL's PPOTrainer on the same weights; per-iteration times from wrappers around its module functions."""
    if trl_path:
        sys.path.insert(0, trl_path)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl

    try:
        ppo_module = importlib.import_module("trl.experimental.ppo.ppo_trainer")
        from trl.experimental.ppo import PPOConfig as TRLPPOConfig, PPOTrainer
    except ImportError as error:
        raise RuntimeError(f"trl {trl.__version__} at {Path(trl.__file__).parent} has no PPO trainer ({error}); "
                           "it was removed in trl 1.13: see the docstring for installing trl 1.12.0 beside it"
                           ) from error
    import datasets
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaTokenizer,
                              TrainerCallback)

    work = Path(tempfile.mkdtemp(prefix="bench_ppo_trl_"))
    try:
        save_hf(policy.cpu(), work / "policy")
        shutil.copyfile(tokenizer_path, work / "policy" / "tokenizer.model")
        hf_tokenizer = LlamaTokenizer.from_pretrained(work / "policy")
        hf_tokenizer.pad_token = hf_tokenizer.unk_token  # id 0: never in a prompt (TRL masks pad ids out)
        hf_tokenizer.padding_side = "left"
        hf_policy = LlamaForCausalLM.from_pretrained(work / "policy", torch_dtype=torch.float32)
        config = LlamaConfig.from_pretrained(work / "policy", num_labels=1, pad_token_id=0)
        torch.manual_seed(1)
        value_model = LlamaForSequenceClassification(config)
        value_model.model.load_state_dict(hf_policy.model.state_dict())  # a copy of the backbone, as ours
        reward_model = LlamaForSequenceClassification(config)
        dataset = datasets.Dataset.from_dict({"input_ids": prompt_tokens})
        args = TRLPPOConfig(
            output_dir=str(work / "out"), per_device_train_batch_size=setup.batch, gradient_accumulation_steps=1,
            num_mini_batches=setup.batch // setup.mini_batch, num_ppo_epochs=1, response_length=setup.new_tokens,
            total_episodes=setup.batch * setup.iterations, local_rollout_forward_batch_size=setup.batch,
            stop_token="eos", kl_coef=0.01, learning_rate=1e-4, lr_scheduler_type="constant", temperature=1.0,
            num_sample_generations=0,
            report_to=[], save_strategy="no", logging_strategy="no", seed=0, use_cpu=device == "cpu",
            bf16=bf16, fp16=False, disable_tqdm=True,
        )  # fmt: skip

        times: list[dict[str, float]] = [{"generation": 0.0, "scoring": 0.0}]
        marks = [time.perf_counter()]

        def timed(name: str, fn, only=None):
            def wrapper(model, *a, **k):
                start = time.perf_counter()
                try:
                    return fn(model, *a, **k)
                finally:
                    if only is None or model is only():
                        times[-1][name] += time.perf_counter() - start
            return wrapper

        class StepTimer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                marks.append(time.perf_counter())
                total = marks[-1] - marks[-2]
                times[-1]["update"] = total - times[-1]["generation"] - times[-1]["scoring"]
                times.append({"generation": 0.0, "scoring": 0.0})

        trainer = PPOTrainer(args=args, processing_class=hf_tokenizer, model=hf_policy, ref_model=None,
                             reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                             eval_dataset=dataset)
        trainer.add_callback(StepTimer())
        with contextlib.ExitStack() as stack:
            for name, wrapped in (("batch_generation", timed("generation", ppo_module.batch_generation)),
                                  ("get_reward", timed("scoring", ppo_module.get_reward,
                                                       only=lambda: trainer.reward_model))):
                original = getattr(ppo_module, name)
                setattr(ppo_module, name, wrapped)
                stack.callback(setattr, ppo_module, name, original)
            marks[0] = time.perf_counter()
            trainer.train()
        return times[:-1], trl.__version__
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the reported configuration")
    parser.add_argument("--size", choices=sorted(SIZES), help="a larger configuration instead (for a GPU)")
    parser.add_argument("--skip-trl", action="store_true", help="time policy.ppo only")
    parser.add_argument("--trl-path", default=str(REPO / "var" / "trl-1.12.0"),
                        help="folder holding a trl with trl.experimental.ppo ('' : the installed trl)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for training forwards, both sides (CUDA)")
    parser.add_argument("--tokenizer", default=str(TOKENIZER), help="the Llama 2 tokenizer.model")
    options = parser.parse_args()
    tokenizer_path = Path(options.tokenizer)
    if not tokenizer_path.exists():
        sys.exit(f"the Llama 2 tokenizer is not at {tokenizer_path}")
    setup = SIZES[options.size] if options.size else FULL if options.full else QUICK
    torch.set_num_threads(options.threads)
    tokenizer = Tokenizer(tokenizer_path)
    prompts = bench_prompts(setup.batch * setup.iterations)
    torch.manual_seed(0)
    policy = Transformer(setup.args).eval()
    reward_models = tuple(RewardModel(setup.args).eval().to(options.device) for _ in range(2))
    initial = {k: v.clone() for k, v in policy.state_dict().items()}

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {options.threads} threads, "
          f"device {options.device}, bf16 {options.bf16}; dim {setup.args.dim}, {setup.args.n_layers} layers, "
          f"batch {setup.batch}, "
          f"mini-batch {setup.mini_batch}, {setup.new_tokens} new tokens, {setup.iterations} iterations")
    rows = {"policy.ppo (ours)": ours(setup, tokenizer, policy, reward_models, prompts, options.device, options.bf16)}
    trl_note = "TRL skipped (--skip-trl)" if options.skip_trl else ""
    if not options.skip_trl:
        try:
            policy.load_state_dict(initial)
            prompt_tokens = [tokenizer.encode_dialog(p.messages) for p in prompts]
            trl_times, version = trl_ppo(setup, tokenizer_path, policy, prompt_tokens, options.trl_path,
                                         options.device, options.bf16)
            rows[f"TRL {version} experimental PPOTrainer"] = trl_times
        except Exception as error:  # report why, keep our numbers
            trl_note = f"TRL not run: {type(error).__name__}: {error}"
            traceback.print_exc()

    if options.device == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print("\n| implementation | generation s | scoring s | forward + update s | iteration s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, iterations in rows.items():
        best = min(iterations, key=lambda t: t["generation"] + t["scoring"] + t["update"])
        total = best["generation"] + best["scoring"] + best["update"]
        print(f"| {name} | {best['generation']:.3f} | {best['scoring']:.3f} | {best['update']:.3f} | {total:.3f} |")
    if trl_note:
        print(f"\n{trl_note}")


if __name__ == "__main__":
    main()
