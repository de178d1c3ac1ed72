"""Cross-block reconstruction (CBQ-style): tune the scales of a window of consecutive quantized
blocks so the window's output matches the fp model's, errors of earlier blocks included.

After allocation every block has its format and codes (GPTQ or round-to-nearest). Window by
window (``window`` blocks), with the earlier windows already tuned and quantized:

    x_q  = the quantized model's input to the window;  y = the fp model's output of the window
    minimise  |window_q(x_q) - y|^2 / |y|^2  over  g  (one log-gain per scale group)
    with each quantized weight  W = q * (scale * exp(g))  and the codes q fixed

Activation fake-quantization passes gradients straight through. The tuned scales are rounded to
fp16 values (what the graph stores); the codes stay, so the recipe stores them and replays
exactly. The deployed format is unchanged.

With ``rounding="learned"`` the codes are learned too, jointly with the log-gains (AutoRound-style
sign/straight-through rounding inside CBQ's cross-block window): every code may move one step from
the code it starts from (GPTQ's, or round-to-nearest's) towards the fp weight,

    W = (scale * exp(g)) * (q + d * h),   d = sign(W_fp / scale - q),   h = [V >= 0] in {0, 1}

with V learnable (start -1: every code where it was) and h's gradient passed straight through
sigmoid(V). The forward pass always uses the hard codes, so the scales adapt to the codes that
are deployed (AdaRound's soft rectified sigmoid with an annealed regulariser was measured too
and lost to this on the tiny models: docs/results.md). A code that would leave the format's range
does not move. The result is an ordinary symmetric INT code with an fp16 scale per group, so
every format and target keeps its layout and legality.

A window's result depends only on the formats of the blocks up to its end (and the vocabulary
formats that make block 0's input), so repair's plans, which differ from one another in a few
blocks, share every window before the first block that changed: ``WindowCache`` keeps them.
With ``retune="changed"`` a window after the first change whose own blocks kept their formats
keeps its tuned scales (and codes) from the last plan that tuned it, where they still match the
fp output better than the plan's untuned codes on its new input: only the windows holding a
changed block are tuned again (each tuned window aims at the fp model's output, so the input of
the windows after it moves little). The plan is measured on held-out text either way.
Windows of fp16 blocks before a plan's first quantized block, on the fp model's own input (bit
for bit), output their fp targets without a pass; a window with nothing to tune runs once.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
from torch.nn.utils import parametrize

from .apply import BlockTransform, fold_block, restored, transforms_applied
from .arch import ArchSpec
from .blocks import BlockRunner, blocks_of, get_module
from .device import kept_on
from .quant import QuantizedWeight, dequantize, measured, qrange

ROUNDINGS = ("fixed", "learned")  # what reconstruction tunes: the scales, or the scales and each code's rounding
RETUNES = ("all", "changed")  # which windows a later plan tunes again: all after its first change, or those it changed
V_START = -1.0  # every code starts where it was (h = [V >= 0] = 0)
ROUND_LR = 0.05  # Adam's step on V: a code crosses over after about 20 consistent steps
E2E_LR = 1e-3  # Adam's step on the log-gains when all blocks are tuned end to end against the fp logits


class _Dequantized(torch.nn.Module):
    """Parametrization of a linear's weight: ``q * (scale * exp(gain))``, ``gain`` learnable [out, G]."""

    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        self.register_buffer("q", qw.q.float())
        self.register_buffer("scale", qw.scale.float())
        self.gain = torch.nn.Parameter(torch.zeros_like(qw.scale))
        self.block_size = qw.block_size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # in the model's dtype (fp16 calibration too)
        return dequantize(self.q, self.scale * torch.exp(self.gain), self.block_size).to(weight.dtype)

    def tuned(self, qw: QuantizedWeight) -> QuantizedWeight:
        """``qw`` with the tuned scales, rounded to fp16 values (on ``qw``'s device)."""
        scale = (self.scale * torch.exp(self.gain.detach())).half().float()
        return replace(qw, scale=scale.to(qw.scale.device))


class _LearnedRounding(_Dequantized):
    """``(scale * exp(gain)) * (q + d * h)``: the scales' gains and every code's rounding learnable."""

    def __init__(self, qw: QuantizedWeight, fp_weight: torch.Tensor):
        super().__init__(qw)
        qmin, qmax = qrange(qw.bits)
        out_f, in_f = qw.q.shape
        groups = fp_weight.detach().float().view(out_f, in_f // qw.block_size, qw.block_size)
        exact = (groups / qw.scale.float().unsqueeze(-1)).view(out_f, in_f)
        q = qw.q.float()
        d = torch.sign(exact - q)
        d = torch.where((q + d < qmin) | (q + d > qmax), torch.zeros_like(d), d)
        self.register_buffer("d", d)
        self.v = torch.nn.Parameter(torch.full_like(q, V_START))

    def step(self) -> torch.Tensor:
        """Where each code moves (1) or stays (0): [V >= 0], without a gradient."""
        return (self.v.detach() >= 0).float()

    def h(self) -> torch.Tensor:
        """The hard step, its gradient straight through sigmoid(V)."""
        soft = torch.sigmoid(self.v)
        return soft + (self.step() - soft).detach()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        codes = self.q + self.d * self.h()
        return dequantize(codes, self.scale * torch.exp(self.gain), self.block_size).to(weight.dtype)

    def moved(self) -> int:
        return int((self.step() * self.d != 0).sum())

    def tuned(self, qw: QuantizedWeight) -> QuantizedWeight:
        codes = (self.q + self.d * self.step()).to(torch.int8)
        return replace(super().tuned(qw), q=codes.to(qw.q.device))


class WindowCache:
    """Tuned windows of recent plans: key -> (record, tuned codes per block, the quantized model's
    output of the window). Valid within one calibration (one table of block transforms per format);
    entries not used by the last ``keep`` plans are dropped (each holds one hidden state).
    ``retune="changed"``: also the last tuned codes of every window by its own blocks' formats
    (``own``), which a later plan reuses where only earlier blocks changed (module docstring).
    It also holds the fp model's output of every window (``fp_runner``) for the whole calibration:
    one hidden state a window, captured once instead of once per plan."""

    def __init__(self, keep: int = 3, retune: str = "all"):
        if retune not in RETUNES:
            raise ValueError(f"retune must be one of {', '.join(RETUNES)}, got {retune!r}")
        self.keep, self.retune, self.entries, self.own, self.plans = keep, retune, {}, {}, []
        self.hits = self.reused = 0
        self._fp: tuple | None = None  # (ids, window ends, runner): the fp model's window outputs, the same for every plan

    def fp_runner(self, model, spec: ArchSpec, ids: torch.Tensor, ends: tuple[int, ...]) -> BlockRunner:
        """The unscored runner holding the fp model's output of every window on ``ids`` (one capture
        pass per calibration, not per plan: the model's fp weights and the windows do not change)."""
        if self._fp is None or self._fp[1] != ends or not torch.equal(self._fp[0], ids):
            self._fp = (ids.clone(), ends, BlockRunner(model, spec, ids, outputs=ends, scored=False))
        return self._fp[2]

    def get(self, key):
        hit = self.entries.get(key)
        self.hits += hit is not None
        return hit

    def put(self, key, value) -> None:
        self.entries[key] = value
        if self.retune == "changed":
            self.own[_own_key(key)] = value[1]

    def end_plan(self, keys: list) -> None:
        self.plans = (self.plans + [set(keys)])[-self.keep:]
        live = set().union(*self.plans)
        self.entries = {k: v for k, v in self.entries.items() if k in live}
        owned = {_own_key(k) for k in live}
        self.own = {k: v for k, v in self.own.items() if k in owned}


def _window_key(transforms: list[BlockTransform], vocab, blocks: range, settings: tuple) -> tuple:
    fmts = tuple((t.format, t.quantizer) for t in transforms[: blocks[-1] + 1])
    return (vocab.embed.name, vocab.head.name, settings, fmts, blocks[0])


def _own_key(key: tuple) -> tuple:
    """A window key's part that its tuned codes depend on: the settings and its own blocks' formats."""
    _embed, _head, settings, fmts, first = key
    return settings, first, fmts[first:]


def reconstruct(model, spec: ArchSpec, transforms: list[BlockTransform], vocab, ids: torch.Tensor, *, window: int,
                steps: int, lr: float = 2e-3, batch: int = 2, log=print, rounding: str = "fixed",
                cache: WindowCache | None = None) -> tuple[list[BlockTransform], list[dict]]:
    """Tune every quantized block's scales (and with ``rounding="learned"`` its codes' rounding),
    ``window`` blocks at a time, on token windows ``ids`` [N, S].

    Returns the transforms with their tuned codes and scales (``codes``; quantizer "<q>+cbq", or
    "<q>+cbq-round") and one record per window (loss before and after, codes moved; ``cached``
    when ``cache`` had it). The model is left as it came in."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    count = len(blocks_of(model, spec))
    ends = tuple(i for i in range(count) if (i + 1) % window == 0 or i + 1 == count)
    if cache is not None:  # the targets stay for the next plan
        runner = cache.fp_runner(model, spec, ids, ends)
        layers, targets = runner.layers, dict(runner.outputs)
    else:
        runner = BlockRunner(model, spec, ids, outputs=ends, scored=False)  # the fp model's output of every window
        layers, targets = runner.layers, runner.outputs  # popped window by window: freed as they are used
    tuned, records, keys = list(transforms), [], []
    settings = (window, steps, lr, batch, tuple(ids.shape), rounding)
    fp_weights = _folded_weights(model, spec, transforms) if rounding == "learned" else None
    suffix = "+cbq-round" if rounding == "learned" else "+cbq"
    with transforms_applied(model, spec, transforms, vocab) as qweights:
        x_q = runner.embed(ids)  # block 0's input through the deployed table (times Falcon-H1's embedding multiplier)
        exact = torch.equal(x_q, runner.first_hidden)  # x_q is the fp model's hidden state, bit for bit
        for start in range(0, len(layers), window):
            blocks = range(start, min(start + window, len(layers)))
            target = targets.pop(blocks[-1])
            key = _window_key(transforms, vocab, blocks, settings)
            keys.append(key)
            exact = exact and all(_unchanged(transforms[i], spec) for i in blocks)
            hit = cache.get(key) if cache is not None and not exact else None
            if exact:  # fp blocks on the fp input: their output is the target (the capture ran the same blocks)
                record, codes, x_q = {"before": 0.0, "after": 0.0, "steps": 0, **_none_moved(fp_weights is not None)}, {}, target
            elif hit is not None:
                record, codes, x_q = hit
                record = {**record, "cached": True}
            else:
                earlier = cache.own.get(_own_key(key)) if cache is not None and cache.retune == "changed" else None
                reused = _reused_window(runner, blocks, x_q, target, earlier) if earlier else None
                if reused is not None:
                    cache.reused += 1
                    record, codes, x_q = reused
                else:
                    record, codes, x_q = _tune_window(runner, spec, blocks, qweights, x_q, target, steps=steps, lr=lr,
                                                      batch=batch, fp_weights=fp_weights)
                if cache is not None:
                    cache.put(key, (record, codes, x_q))
            records.append({"blocks": list(blocks), **record})
            moved = f", {record['moved']} of {record['codes']} codes moved" if "moved" in record else ""
            log(f"reconstruction: blocks {blocks[0]}-{blocks[-1]}: relative error {record['before']:.4g} -> {record['after']:.4g}{moved}")
            for i, block_codes in codes.items():
                tuned[i] = replace(tuned[i], codes=block_codes, quantizer=f"{tuned[i].quantizer}{suffix}")
    if cache is not None:
        cache.end_plan(keys)
    return tuned, records


def _unchanged(t: BlockTransform, spec: ArchSpec) -> bool:
    """True when ``t`` leaves its block as the fp model has it: no quantized linear, no fold."""
    return not t.smooth and all(fmt.bits is None for fmt in t.formats(spec).values())


@torch.no_grad()
def _reused_window(runner: BlockRunner, blocks: range, x_q, target, codes: dict):
    """The window with an earlier plan's tuned ``codes`` ({block: {linear: QuantizedWeight}}; its
    blocks' formats are this plan's, its input ``x_q`` is not): (record, codes, the window's
    output), or None where they do not match ``target`` better than the plan's untuned codes do on
    this input (the model's weights left as they came)."""
    layers = runner.layers

    def loss(out: torch.Tensor) -> float:
        return float(_relative_error(out, target))

    with kept_on([layers[i] for i in blocks], runner.ids.device):
        before = loss(_window_output(runner, blocks, x_q))  # the plan's own codes, as transforms_applied set them
        linears = {(i, n): get_module(layers[i], n) for i, block in codes.items() for n in block}
        untuned = {k: linear.weight.data for k, linear in linears.items()}
        for (i, n), linear in linears.items():
            linear.weight.data = codes[i][n].dequantize().to(linear.weight.device, linear.weight.dtype)
        out = _window_output(runner, blocks, x_q)
        after = loss(out)
        if not math.isfinite(after) or after >= before:  # not better: tuned on this input instead
            for k, linear in linears.items():
                linear.weight.data = untuned[k]
            return None
    return {"before": before, "after": after, "steps": 0, "reused": True}, codes, out


def _relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|out - target|^2 / |target|^2 in fp32 whatever the model's dtype (fp16 squares overflow above 256)."""
    out, target = out.float(), target.float()
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12)


def _folded_weights(model, spec: ArchSpec, transforms: list[BlockTransform]) -> dict[str, torch.Tensor]:
    """The fp weight of every linear a transform quantizes, after its block's folds (what its codes
    approximate): ``{path: [out, in]}``, on the CPU."""
    out = {}
    for index, (layer, t) in enumerate(zip(blocks_of(model, spec), transforms)):
        formats = t.formats(spec)
        names = [n for n in spec.linears if formats[n].bits is not None]
        if not names:
            continue
        with restored(layer):
            fold_block(layer, spec, t.smooth)
            for name in names:
                out[f"{spec.blocks}.{index}.{name}"] = get_module(layer, name).weight.detach().float().cpu().clone()
    return out


def _tune_window(runner: BlockRunner, spec: ArchSpec, blocks: range, qweights, x_q, target, *, steps: int, lr: float, batch: int,
                 fp_weights: dict[str, torch.Tensor] | None = None):
    """Tune one window; returns (record, {block: tuned codes per linear}, the window's quantized output)."""
    layers = runner.layers
    paths = {i: {n: f"{spec.blocks}.{i}.{n}" for n in spec.linears if f"{spec.blocks}.{i}.{n}" in qweights} for i in blocks}
    with kept_on([layers[i] for i in blocks], runner.ids.device):  # trained: no offload between calls
        record, results, out = _tune(runner, blocks, paths, qweights, x_q, target, steps=steps, lr=lr, batch=batch,
                                     fp_weights=fp_weights)
    codes = {i: {n: measured(results[paths[i][n]], get_module(layers[i], n).weight) for n in paths[i]} for i in blocks if paths[i]}
    if out is None:  # the window's weights went back to where they started: its output again
        out = _window_output(runner, blocks, x_q)
    return record, codes, out


@torch.no_grad()
def _window_output(runner: BlockRunner, blocks: range, x: torch.Tensor) -> torch.Tensor:
    """The window's output for ``x`` with the weights its blocks hold now."""
    for i in blocks:
        x = runner.run_block(i, x)
    return x


def _tune(runner: BlockRunner, blocks, paths, qweights, x_q, target, *, steps: int, lr: float, batch: int,
          fp_weights: dict[str, torch.Tensor] | None = None):
    """Adam on the window's log-gains (and, given ``fp_weights``, on its codes' rounding); returns
    ({"before", "after", "steps"[, "moved", "codes"]}, {path: tuned QuantizedWeight}, the tuned
    window's output for every row of ``x_q``, or None where the tuning was not kept)."""
    layers = runner.layers
    params = {}
    for i in blocks:
        for name, path in paths[i].items():
            linear = get_module(layers[i], name)
            qw = qweights[path]
            if fp_weights is None:
                module = _Dequantized(qw)
            else:
                module = _LearnedRounding(qw, fp_weights[path].to(qw.q.device))
            parametrize.register_parametrization(linear, "weight", module)
            params[path] = linear.parametrizations.weight[0]
    learned = fp_weights is not None
    try:
        def forward(rows) -> torch.Tensor:
            out = x_q[rows]
            for i in blocks:
                out = runner.block_forward(i, out)
            return out

        def loss(rows, out: torch.Tensor | None = None) -> torch.Tensor:
            return _relative_error(forward(rows) if out is None else out, target[rows])

        every = torch.arange(x_q.shape[0])
        if not params:  # nothing to tune: the window's output once
            with torch.no_grad():
                out = forward(every)
            error = float(loss(every, out))
            return {"before": error, "after": error, "steps": 0, **_none_moved(learned)}, {}, out
        with torch.no_grad():
            before = float(loss(every))
        groups = [{"params": [p.gain for p in params.values()], "lr": lr}]
        if learned:
            groups.append({"params": [p.v for p in params.values()], "lr": ROUND_LR})
        optimizer = torch.optim.Adam(groups)
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            rows = torch.randperm(x_q.shape[0], generator=generator)[:batch]
            optimizer.zero_grad()
            value = loss(rows)
            value.backward()
            optimizer.step()
        results = {path: p.tuned(qweights[path]) for path, p in params.items()}
        moves = {"moved": sum(p.moved() for p in params.values()), "codes": sum(p.q.numel() for p in params.values())} if learned else {}
    finally:
        for i in blocks:
            for name in paths[i]:
                parametrize.remove_parametrizations(get_module(layers[i], name), "weight", leave_parametrized=False)
    def set_weights(chosen: dict) -> None:
        for i in blocks:
            for name, path in paths[i].items():
                weight = get_module(layers[i], name).weight
                weight.data = chosen[path].dequantize().to(weight.device, weight.dtype)

    set_weights(results)  # the tuned (fp16-rounded) weights, for the windows after this one
    with torch.no_grad():
        out = forward(every)
        after = float(loss(every, out))
    if not math.isfinite(after) or after > before:  # never keep a worse window
        results = {path: qweights[path] for path in results}
        set_weights(results)
        after, out = before, None
        moves = {**moves, "moved": 0} if moves else moves
    return {"before": before, "after": after, "steps": steps, **moves}, results, out


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions, in nats (fp32)."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def kl_passes(model, teacher, gains: list[torch.Tensor], ids: torch.Tensor, *, epochs: int, lr: float = E2E_LR,
              device: str = "cpu", log=print) -> list[float]:
    """Adam on ``gains`` so ``model``'s next-token distribution matches ``teacher``'s (``logit_kl``)
    on token windows ``ids`` [N, S], one window a step, ``epochs`` passes in a seeded order; the
    mean KL of each pass (logged as it ends)."""
    started = time.perf_counter()
    optimizer = torch.optim.Adam(gains, lr=lr)
    generator = torch.Generator().manual_seed(0)
    passes = []
    for epoch in range(epochs):
        total = 0.0
        for row in torch.randperm(ids.shape[0], generator=generator).tolist():
            window = ids[row:row + 1].to(device)
            with torch.no_grad():
                target = teacher(input_ids=window, use_cache=False).logits
            optimizer.zero_grad()
            loss = logit_kl(model(input_ids=window, use_cache=False).logits, target)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        passes.append(total / ids.shape[0])
        log(f"end-to-end tuning: pass {epoch + 1} of {epochs}, mean KL {passes[-1]:.5f} ({time.perf_counter() - started:.0f} s)")
    return passes


def tune_end_to_end(model, teacher, spec: ArchSpec, transforms: list[BlockTransform], vocab, ids: torch.Tensor, *,
                    epochs: int, lr: float = E2E_LR, device: str = "cpu", log=print) -> tuple[list[BlockTransform], dict]:
    """Tune every quantized block linear's scales, all blocks at once, so the quantized model's
    next-token distribution matches ``teacher``'s (the fp model; KL, no labels) on token windows
    ``ids`` [N, S], one window a step, ``epochs`` passes in a seeded order. The codes stay (one
    log-gain per scale group, as ``reconstruct``; the scales rounded to fp16 after). Returns the
    transforms with those codes (quantizer "<q>+e2e") and a record (mean KL of the first and the
    last pass, steps, seconds). The model is left as it came in."""
    started = time.perf_counter()
    layers = blocks_of(model, spec)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    modules: dict[str, _Dequantized] = {}
    try:
        with transforms_applied(model, spec, transforms, vocab) as qweights, \
                kept_on([*layers, *blocks_of(teacher, spec)], device):
            paths = [path for path in qweights if path.startswith(f"{spec.blocks}.")]
            for path in paths:
                linear = get_module(model, path)
                parametrize.register_parametrization(linear, "weight", _Dequantized(qweights[path]))
                modules[path] = linear.parametrizations.weight[0]
            try:
                passes = kl_passes(model, teacher, [m.gain for m in modules.values()], ids, epochs=epochs, lr=lr,
                                   device=device, log=log)
                tuned = {path: m.tuned(qweights[path]) for path, m in modules.items()}
            finally:
                for path in modules:
                    parametrize.remove_parametrizations(get_module(model, path), "weight", leave_parametrized=False)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    out = list(transforms)
    prefix = f"{spec.blocks}."
    for path, qw in tuned.items():
        index, name = path[len(prefix):].split(".", 1)
        t = out[int(index)]
        quantizer = t.quantizer if t.quantizer.endswith("+e2e") else f"{t.quantizer}+e2e"
        out[int(index)] = replace(t, codes={**t.codes, name: qw}, quantizer=quantizer)
    record = {"first_pass_kl": passes[0], "last_pass_kl": passes[-1], "steps": epochs * ids.shape[0],
              "windows": ids.shape[0], "seconds": time.perf_counter() - started}
    return out, record


def _none_moved(learned: bool) -> dict:
    """A window record's code counts where nothing was tuned (learned rounding records them)."""
    return {"moved": 0, "codes": 0} if learned else {}

