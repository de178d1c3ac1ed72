"""Text generation through the deployed graph: KV cache, seeded sampling, streaming (no torch).

``python -m runtime.generate --bundle DIR --prompt TEXT --max-new-tokens N [--backend ort|trt]``
prints the continuation as it is produced.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .bundle import BundleError, open_bundle


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0; otherwise temperature, then top-k, then top-p (nucleus)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")


def next_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick a token id from one position's logits [V]."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < len(z):  # a top-k as large as the vocabulary keeps every token
        kth = np.partition(z, -sampling.top_k)[-sampling.top_k]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if sampling.top_p < 1:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, sampling.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))


def generate_ids(model, prompt_ids: list[int], *, max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield new token ids: one prefill of the prompt, then one decode step per token through the KV cache."""
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    rng = np.random.default_rng(sampling.seed)
    logits, past = model.forward(np.asarray([prompt_ids], dtype=np.int64))
    for step in range(max_new_tokens):
        token = next_token(logits[0, -1], sampling, rng)
        yield token
        if token in stop_ids or step == max_new_tokens - 1:
            return
        logits, past = model.forward(np.asarray([[token]], dtype=np.int64), past)


def stream_text(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Decoded text pieces as tokens arrive (decodes the whole continuation, yields the new suffix)."""
    out: list[int] = []
    shown = ""
    for token in ids:
        out.append(token)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown):]
            shown = text


def check_threads(threads: int | None) -> None:
    """``--threads``: None (the runtime's default) or a count from 1 to 4 x the machine's CPUs
    (beyond that each thread's stack and arena only cost memory)."""
    cpus = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= 4 * cpus:
        raise ValueError(f"--threads must be from 1 to {4 * cpus} (4 x this machine's {cpus} CPUs), got {threads}")


INTERRUPTED = "interrupted (Ctrl-C)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.generate", description="Generate text with a QuBLAST bundle.")
    p.add_argument("--bundle", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--backend", choices=("ort", "trt"), default="ort")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    started = False  # text is on stdout: an error starts a line of its own
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        check_threads(args.threads)
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("--prompt is not valid UTF-8") from None
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        sampled = [f"--{dest.replace('_', '-')}" for dest in ("top_k", "top_p", "seed")
                   if getattr(args, dest) != p.get_default(dest)]
        if sampled and args.temperature == 0:
            raise ValueError(f"{', '.join(sampled)} {'has' if len(sampled) == 1 else 'have'} no effect on greedy decoding: "
                             f"give --temperature > 0")
        bundle = open_bundle(args.bundle, backend=args.backend, threads=args.threads)
        prompt = bundle.tokenizer.encode(args.prompt, add_special_tokens=False).ids
        if not prompt:
            raise ValueError("the prompt has no tokens")
        bundle.check_length(len(prompt) + args.max_new_tokens,
                            f"the prompt ({len(prompt)} tokens) plus --max-new-tokens {args.max_new_tokens}")
        eos = bundle.eos_id()
        ids = generate_ids(bundle.model, prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=(eos,) if eos is not None else ())
        for piece in stream_text(bundle.tokenizer, ids):
            print(piece, end="", flush=True)
            started = True
        print()
    except (BundleError, ValueError, RuntimeError, OSError) as exc:  # RuntimeError: TensorRT/CUDA unavailable or failing
        print(f"\nqublast: error: {exc}" if started else f"qublast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nqublast: error: {INTERRUPTED}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
