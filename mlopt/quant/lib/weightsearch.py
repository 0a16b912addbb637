"""The decoder PTQ search: measure weight-only candidates on the runtime and keep the fastest within budget.

Quality first (cheap): every INT4 algorithm and block size, and INT8, is quantized and scored by
teacher-forced perplexity on held-out windows of the text and, once timed, by greedy-token agreement
with FP32 (not a candidate slower than FP32: it cannot be kept, and generating on its slow kernel takes
minutes).
When no INT4 candidate is within the perplexity budget, the weight groups (embedding, LM head,
first and last blocks, attention, MLP) are ranked by how much raising each one alone to 8 bits (the
embedding: to float) recovers, and raised in that order until the budget is met: the measured
per-layer sensitivity decides the mix, and its base is the best INT4 candidate that decodes faster
than FP32 when timed once beside it (hqq's float zero points run on a slow kernel). Each candidate is
screened that way, two models loaded at a time. Then the candidates within budget that decoded faster
than FP32 are timed again, together with FP32 in interleaved rounds with onnxruntime-genai (time to
first token, decode tokens/s), and the one that decodes fastest there, and faster than FP32, is kept
(INT4 or INT8; of those within DECODE_TIE of the fastest, the one with the lowest perplexity), else
FP32, with the reason.

Before that, each candidate within budget whose kernels quantize activations (accuracy level 4) gets a
SmoothQuant twin (`smoothing`, scales folded into the norms and up projections: the same kernels at the
same speed), and of each pair the one with the lower perplexity stays in the running; and the INT8
candidate with the largest block gets the smallest block for one role of the layers' MatMuls at a time
(`_refine_blocks`), where int8 activations cost the most perplexity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlopt.core import console
from mlopt.core.errors import InputError, RunError, first_line
from mlopt.quant.lib.sourcegrid import lies_on_grids
from mlopt.quant.lib.weightonly import GROUPS, TextCalibration, WeightScheme, int8_scheme, quantize_folder
from mlopt.runtime import generation
from mlopt.runtime.artifacts import copy_genai_files, folder_size_mb
from mlopt.runtime.decoder import onnx_name

PROMPTS = 8  # greedy-agreement prompts cut from the held-out text
AGREEMENT_PROMPT, AGREEMENT_TOKENS = 32, 32
CALIBRATION_WINDOWS = 16
#: a chosen candidate whose greedy agreement is this much below another's within budget gets a note saying so
AGREEMENT_GAP = 0.25
#: Candidates decoding within this fraction of the fastest are tied on speed (the run-to-run spread of decode
#: rates on a shared 2-core machine); of those the one with the lowest perplexity is kept.
DECODE_TIE = 0.05


@dataclass
class Settings:
    max_ppl_increase: float
    max_ttft_ratio: float
    algorithms: list[str]
    block_sizes: list[int]
    accuracy_levels: list[int]
    window: int
    max_windows: int
    prompt_tokens: int
    new_tokens: int
    rounds: int
    smooth_alpha: float = 0.0  # SmoothQuant for candidates with int8 activations (accuracy level 4); 0: none


@dataclass
class Row:
    """One measured decoder: FP32 (scheme None) or a candidate."""

    scheme: WeightScheme | None
    folder: Path
    perplexity: float
    agreement: float | None  # greedy agreement with FP32; None for a candidate slower than FP32 (Search._agree)
    size_mb: float
    within_budget: bool = True
    timing: dict[str, Any] = field(default_factory=dict)  # ttft_ms {p50, p90}, decode_tokens_per_s, prompt_tokens_per_s
    peak_rss_mb: float | None = None
    base_decode: float = 0.0  # FP32's decode tokens/s in the same rounds as `timing`
    window_nll: list[float] = field(default_factory=list)  # mean NLL per perplexity window (paired intervals)
    outranked: bool = False  # its twin with or without smoothing (the same kernels) scored a lower perplexity

    @property
    def name(self) -> str:
        return "FP32" if self.scheme is None else self.scheme.label

    @property
    def decode(self) -> float:
        return float(self.timing.get("decode_tokens_per_s") or 0.0)


@dataclass
class Text:
    """What the search cuts from the text: perplexity ids, agreement prompts, the timing prompt, calibration."""

    ppl_ids: list[int]
    bos: int | None  # the BOS token windows and prompts start with (generation.bos_token)
    prompts: list[list[int]]
    timing_prompt: list[int]
    calibration: list[list[int]]


def cut_text(folder: Path, data: Any, s: Settings) -> Text:
    val = generation.token_ids(folder, list(data.val))
    train = generation.token_ids(folder, list(data.train))
    if len(val) < s.window:
        raise InputError(f"the held-out text has {len(val)} tokens; one perplexity window needs {s.window} "
                         "(give a longer text:FILE or a smaller --window)")
    bos = generation.bos_token(folder)  # read once: every candidate shares the tokenizer
    prompts = generation.prompts_from(val, PROMPTS, AGREEMENT_PROMPT, bos)
    timing = generation.prompt_of(val, s.prompt_tokens)
    calibration = calibration_windows(train, s.window) or calibration_windows(val, s.window)[:1]
    return Text(val, bos, prompts, timing, calibration)


def calibration_windows(ids: list[int], window: int) -> list[list[int]]:
    """Up to CALIBRATION_WINDOWS windows of `window` tokens cut from the ids, as they come: no BOS token first.
    (Measured on Gemma 3, whose tokenizer adds one: smoothing calibrated on windows that start with BOS made its
    INT8 with blocks of 128 worse, +0.7% perplexity with the BOS position in the ranges and +0.9% without it,
    where windows of text alone made it better, +0.4% to +0.2%; 60 held-out windows, one run each.)"""
    return [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)][:CALIBRATION_WINDOWS]


class Search:
    def __init__(self, fp32: Path, data: Any, settings: Settings, work: Path):
        self.fp32, self.s, self.work = fp32, settings, work
        self.text = cut_text(fp32, data, settings)
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.sensitivity: list[dict[str, Any]] = []
        self.refinement: list[dict[str, Any]] = []  # perplexity recovered by a finer block for one role (_refine_blocks)
        self.failed: list[WeightScheme] = []
        self.reference: list[list[int]] = []  # FP32's greedy continuations, set by _score(None, ...)
        self._smoothed_folders: dict[float, Path | None] = {}
        self.base = self._score(None, fp32)
        self.budget = self.base.perplexity * (1 + settings.max_ppl_increase)

    def _score(self, scheme: WeightScheme | None, folder: Path) -> Row:
        scored = generation.perplexity(folder, self.text.ppl_ids, self.s.window, self.s.max_windows, bos=self.text.bos)
        ppl, self.windows, window_nll = scored["perplexity"], scored["windows"], scored["window_nll"]
        size = folder_size_mb(folder)
        row = Row(scheme, folder, ppl, None, size, window_nll=window_nll)
        if scheme is None:
            self.reference = self._greedy(folder)
            row.agreement = 1.0
        else:
            row.within_budget = ppl <= self.budget
            self.rows.append(row)
            increase = 100 * (ppl / self.base.perplexity - 1)
            console.info(f"{scheme.label}: perplexity {ppl:.3f} ({increase:+.1f}%), {size:.1f} MB"
                         + ("" if row.within_budget else "  [over budget]"))
        return row

    def _greedy(self, folder: Path) -> list[list[int]]:
        model = generation.load_model(folder)
        return [generation.greedy(folder, p, AGREEMENT_TOKENS, model) for p in self.text.prompts]

    def _agree(self, rows: list[Row]) -> None:
        """Greedy agreement with FP32 for `rows` (those that decoded faster than FP32 when screened: a slower one
        cannot be kept, and generating with it on its slow kernel would take minutes)."""
        for row in [r for r in rows if r.agreement is None]:
            greedy = self._greedy(row.folder)
            row.agreement = sum(map(generation.agreement, self.reference, greedy)) / len(greedy)
            console.info(f"{row.name}: greedy agreement with FP32 {row.agreement:.2f}")

    def candidate(self, scheme: WeightScheme) -> Row | None:
        """The measured row of a scheme (quantized once); None when onnxruntime's quantizer cannot build it."""
        known = next((r for r in self.rows if r.scheme == scheme), None)
        if known is not None or scheme in self.failed:
            return known
        folder = self.work / f"c{len(self.rows):02d}"
        calibration = None
        if scheme.algorithm == "gptq" and scheme.bits == 4:
            calibration = _calibration(self.fp32, self.text.calibration)
        try:
            source = self._smoothed(scheme.smooth) if scheme.smooth else self.fp32
            if source is None:
                return None
            quantize_folder(source, folder, scheme, calibration)
        except RunError as exc:  # one algorithm's limits (k_quant's block layout on a narrow model) end no search
            self.notes.append(f"{scheme.label} could not be built: {exc}")
            console.warn(self.notes[-1])
            self.failed.append(scheme)
            return None
        return self._score(scheme, folder)

    def run(self) -> Row:
        level = self.s.accuracy_levels[0]
        for block in self.s.block_sizes:
            self.candidate(int8_scheme(block, level))
        grid = None
        if "grid" in self.s.algorithms and lies_on_grids(self.fp32 / onnx_name(self.fp32)):
            # weights dequantized from a block format (a GGUF file): stored again on their own grid, exactly
            grid = self.candidate(WeightScheme(algorithm="grid", accuracy_level=level))
        int4 = [r for r in (grid, *(self.candidate(WeightScheme(algorithm=a, block_size=b, symmetric=sym,
                                                        accuracy_level=0 if a == "hqq" else level))
                            for a in self.s.algorithms if a != "grid" for b in self.s.block_sizes
                            for sym in ((False, True) if a == "rtn" else (False,)))) if r is not None]
        self._screen()  # a slow kernel (hqq's float zero points) shows here
        if int4 and not any(r.within_budget for r in int4):
            fast = [r for r in int4 if r.decode > r.base_decode]
            if fast:
                self._raise_sensitive(min(fast, key=lambda r: r.perplexity))
            else:
                self.notes.append("no INT4 candidate decoded faster than FP32; no mixed precision was tried")
        for row in [r for r in self.rows if r.within_budget and r.scheme.algorithm != "hqq"]:  # hqq has no levels
            for other in self.s.accuracy_levels[1:]:
                self.candidate(_at_level(row.scheme, other))
        self._smooth_within_budget()
        self._refine_blocks()
        self._screen()
        self._agree([r for r in self.rows if r.decode > r.base_decode])
        finalists = [r for r in self.rows if r.within_budget and r.decode > r.base_decode and not r.outranked]
        if finalists:  # beside FP32 again, all in the same interleaved rounds: the only timings the choice reads
            self._time(finalists, self.s.rounds)
        return self._choose(finalists)

    def _smoothed(self, alpha: float) -> Path | None:
        """The FP32 folder smoothed with `alpha` (written once, in the work folder); None, with a note, when no
        activation's scale folds into a norm or an up projection."""
        if alpha in self._smoothed_folders:
            return self._smoothed_folders[alpha]
        folder: Path | None = self.work / f"smoothed-{alpha:g}"
        try:
            smoothed = smooth_folder(self.fp32, folder, self.text.calibration, alpha)
            note = "" if smoothed else ("no activation of this decoder reaches its MatMuls from a norm or a gated "
                                        "product alone: nothing to smooth")
        except Exception as exc:  # a twin that cannot be built ends no search; the note says why
            note = f"smoothing (alpha {alpha:g}) failed: {type(exc).__name__}: {first_line(exc)[:200]}"
        if note:
            self.notes.append(note)
            console.warn(note)
            folder = None
        self._smoothed_folders[alpha] = folder
        return folder

    def _smooth_within_budget(self) -> None:
        """SmoothQuant twins of the candidates within budget whose kernels quantize activations to int8 (accuracy
        level 4, where an outlier channel flattens the rest of its block): the scales fold into the norms and up
        projections, so a twin runs the same kernels at the same speed, and of each pair only the one with the
        lower perplexity stays in the running. Weights on a source grid stay on it (not smoothed)."""
        alpha = self.s.smooth_alpha
        if not alpha:
            return
        rows = [r for r in self.rows if r.within_budget and r.scheme.accuracy_level == 4
                and not r.scheme.smooth and r.scheme.algorithm != "grid"]  # hqq runs at level 0 only
        if not rows:
            self.notes.append("no candidate within budget quantizes its activations (accuracy level 4, not the grid "
                              "one): nothing was smoothed")
        for row in rows:
            twin = self.candidate(replace(row.scheme, smooth=alpha))
            if twin is None:
                continue
            worse, better = (row, twin) if twin.perplexity < row.perplexity else (twin, row)
            worse.outranked = True
            self.notes.append(f"smoothing (SmoothQuant, alpha {alpha:g}) took {row.name} from perplexity "
                              f"{row.perplexity:.3f} to {twin.perplexity:.3f}; the same kernels, so only "
                              f"{better.name} stays in the running")

    def _refine_blocks(self) -> None:
        """Finer blocks where int8 activations cost the most: the INT8 candidate within budget with the largest
        block (the fastest kernels; of it and its smoothed twin, the one in the running) gets, one role of the
        layers' MatMuls at a time (`block_roles`: q/k/v, the attention output, the MLP's input and output
        projections), the smallest block size instead, for that role's weights and the activation its kernels
        quantize; then every role that lowered perplexity together. Of these mixes only the one with the lowest
        perplexity, and only if lower than its base's, stays in the running (the others are set aside like a
        smoothing pair's worse twin). Such a mix runs nearly at the large block's speed (the LM head, most of a
        small decoder's decode time, keeps its block), so `_choose` keeps it over its base when it decodes within
        DECODE_TIE of it, and the base otherwise. (Gemma 3
        270M, INT8 blocks of 128, smoothed: q/k/v at 32 took held-out perplexity from +0.34% to -0.10% over 74
        windows, paired change -0.44%, -0.68..-0.21%, at 0.98x the decode rate.)"""
        blocks = sorted(set(self.s.block_sizes))
        bases = [r for r in self.rows if r.within_budget and not r.outranked and r.scheme.bits == 8
                 and r.scheme.algorithm == "rtn" and r.scheme.accuracy_level == 4 and not r.scheme.fine
                 and r.scheme.block_size == blocks[-1]]
        if len(blocks) < 2 or not bases:
            return
        import onnx

        from mlopt.quant.lib.weightonly import block_roles

        base = min(bases, key=lambda r: r.perplexity)
        roles = block_roles(onnx.load(str(self.fp32 / onnx_name(self.fp32)), load_external_data=False))
        if not roles:  # MatMuls not named by layer (a graph the builder did not write)
            return
        console.info(f"measuring blocks of {blocks[0]} for each role of {base.name}'s MatMuls: {', '.join(roles)}")
        gains, refined = [], []
        for role in roles:
            row = self.candidate(replace(base.scheme, fine=(role,), fine_block=blocks[0]))
            if row is not None:
                gains.append((base.perplexity - row.perplexity, role))
                refined.append(row)
        gains.sort(reverse=True)
        self.refinement = [{"role": role, "perplexity_recovered": round(gain, 4)} for gain, role in gains]
        helpful = tuple(sorted(role for gain, role in gains if gain > 0))
        together = self.candidate(replace(base.scheme, fine=helpful, fine_block=blocks[0])) if len(helpful) > 1 else None
        refined += [together] if together is not None else []
        best = min(refined, key=lambda r: r.perplexity, default=None)
        for row in refined:  # one mix stays in the running beside its base: the lowest perplexity, if below the base's
            row.outranked = row is not best or row.perplexity >= base.perplexity
        kept = best if best is not None and not best.outranked else None
        self.notes.append(f"blocks of {blocks[0]} instead of {blocks[-1]} on {base.name}, one role at a time: "
                          + ", ".join(f"{role} {-gain:+.3f}" for gain, role in gains) + " perplexity"
                          + (f"; together ({', '.join(helpful)}) {together.perplexity - base.perplexity:+.3f}"
                             if together is not None else "")
                          + (f"; {kept.name} stays in the running" if kept else "; none lowered it: none stays in "
                             "the running"))

    def _screen(self) -> None:
        """Time each candidate not timed yet once, beside FP32 (two models loaded at a time, whatever their size)."""
        for row in [r for r in self.rows if not r.timing]:
            self._time([row], rounds=1, quiet=True)

    def _raise_sensitive(self, base: Row) -> None:
        """Rank the groups by the perplexity that raising each alone recovers; raise them in that order."""
        console.info(f"no INT4 candidate within budget (perplexity <= {self.budget:.3f}); measuring the sensitivity "
                     f"of each weight group on {base.name}")
        gains = []
        for group in GROUPS:
            row = self.candidate(base.scheme.with_raised(group))
            if row is not None:
                gains.append((base.perplexity - row.perplexity, group))
        gains.sort(reverse=True)
        self.sensitivity = [{"group": g, "perplexity_recovered": round(gain, 4)} for gain, g in gains]
        scheme = base.scheme
        for gain, group in gains:
            if gain <= 0:
                break
            scheme = scheme.with_raised(group)
            if scheme.lm_head == "int8" and {"attention", "mlp"} <= set(scheme.raised):
                break  # every MatMul at 8 bits: the INT8 candidates, measured already
            row = self.candidate(scheme)
            if row is not None and row.within_budget:
                return

    def _time(self, rows: list[Row], rounds: int, quiet: bool = False) -> None:
        """Time FP32 and `rows` with onnxruntime-genai in interleaved rounds; each row keeps this timing and the
        FP32 decode rate measured beside it."""
        if not quiet:
            console.info(f"timing FP32 and {len(rows)} candidate(s) with onnxruntime-genai: {self.s.prompt_tokens}-token "
                         f"prompt, {self.s.new_tokens} new tokens, {rounds} interleaved round(s)")
        timed = generation.time_generation([self.base.folder, *(r.folder for r in rows)], self.text.timing_prompt,
                                           self.s.new_tokens, rounds)
        self.base.timing = timed[0]
        for row, timing in zip(rows, timed[1:]):
            row.timing, row.base_decode = timing, self.base.decode

    def _choose(self, finalists: list[Row]) -> Row:
        """The finalist (within budget, faster than FP32 when screened) that decodes fastest in the final rounds,
        faster than FP32 there, with a time to first token within --max-ttft-ratio of FP32's in those rounds (of
        those within DECODE_TIE of the fastest, the lowest perplexity); else FP32. The notes say why no INT4 one
        was kept when none was."""
        faster = [r for r in finalists if r.decode > self.base.decode]
        if _ttft(self.base) > 0:  # FP32 timed in these rounds: the first-token limit applies
            limit = self.s.max_ttft_ratio * _ttft(self.base)
            for slow in [r for r in faster if _ttft(r) > limit]:
                self.notes.append(f"{slow.name} decoded {slow.decode / self.base.decode:.2f}x FP32's rate but its time "
                                  f"to first token was {_ttft(slow) / _ttft(self.base):.2f}x FP32's (at most "
                                  f"{self.s.max_ttft_ratio:g}x: --max-ttft-ratio)")
            faster = [r for r in faster if _ttft(r) <= limit]
        chosen = max(faster, key=lambda r: r.decode) if faster else self.base
        tied = [r for r in faster if r.decode >= (1 - DECODE_TIE) * chosen.decode]
        closer = min(tied, key=lambda r: r.perplexity) if tied else chosen
        if closer is not chosen:
            self.notes.append(f"{closer.name} decoded within {DECODE_TIE:.0%} of the fastest, {chosen.name} "
                              f"({closer.decode:.1f} against {chosen.decode:.1f} tokens/s, within the timing noise), "
                              f"at a lower perplexity ({closer.perplexity:.3f} against {chosen.perplexity:.3f}): kept")
            chosen = closer
        if chosen.scheme is None or chosen.scheme.bits != 4:
            if not any(r.within_budget for r in self.rows if r.scheme.bits == 4):
                self.notes.append(f"no INT4 candidate met the perplexity budget (+{100 * self.s.max_ppl_increase:.1f}%, "
                                  f"at most {self.budget:.3f}), even with its most sensitive weight groups at 8 bits")
            elif chosen.scheme is not None:
                self.notes.append("an INT4 candidate met the perplexity budget; this one decodes faster, or as fast "
                                  "at a lower perplexity, or the INT4 one's time to first token was over "
                                  "--max-ttft-ratio (above)")
        if chosen is self.base:
            self.notes.append("no quantized candidate within budget decoded faster than FP32 with a time to first token "
                              "within --max-ttft-ratio: FP32 is handed back")
        return chosen


def _interval(row: Row, base: Row) -> str | None:
    if len(row.window_nll) < 2 or len(row.window_nll) != len(base.window_nll):
        return None
    low, high = generation.ppl_change_interval(row.window_nll, base.window_nll)
    return f"{100 * low:+.2f} to {100 * high:+.2f}"


def _ttft(row: Row) -> float:
    return float(row.timing.get("ttft_ms", {}).get("p50") or 0.0)


def _at_level(scheme: WeightScheme, level: int) -> WeightScheme:
    return replace(scheme, accuracy_level=level)


def _calibration(folder: Path, windows: list[list[int]]) -> TextCalibration:
    import onnx

    from mlopt.runtime.session import value_info_specs

    graph = onnx.load(str(folder / onnx_name(folder)), load_external_data=False).graph
    config = json.loads((folder / "genai_config.json").read_text())
    return TextCalibration(generation.window_feed(value_info_specs(graph.input), config), windows)


def smooth_folder(fp32: Path, dst: Path, windows: list[list[int]], alpha: float) -> int:
    """Write `dst`: the genai folder `fp32` smoothed (SmoothQuant, `alpha`, folded into norms and up projections
    only) on the channel ranges of calibration `windows`. Returns how many activations were smoothed (0: nothing
    written but the folder)."""
    from mlopt.quant.lib.smoothing import smooth

    dst.mkdir(parents=True, exist_ok=True)
    name = onnx_name(fp32)
    smoothed = smooth(fp32 / name, dst / name, list(_calibration(fp32, windows)), alpha, fold_only=True)
    if smoothed:
        copy_genai_files(fp32, dst, weights=False)
    return smoothed


def search_decoder(artifact: Any, settings: Settings, data: Any, work: Path, out: Path) -> Any:
    """Run the search on a genai artifact, write the chosen folder to `out`, and report every candidate."""
    from mlopt.core.contracts import StepResult

    search = Search(artifact.folder, data, settings, work)
    chosen = search.run()
    base = search.base
    # a fresh process each: FP32, the chosen one, and every candidate that could have been (faster than FP32)
    for row in {id(r): r for r in (base, chosen, *(r for r in search.rows if r.agreement is not None))}.values():
        row.peak_rss_mb = generation.peak_rss_mb(row.folder, search.text.timing_prompt, settings.new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    copy_genai_files(chosen.folder, out)
    metrics = _metrics(search, chosen)
    verdict = (f"chose {chosen.name}: {metrics['decode_speedup']:.2f}x FP32's decode speed, time to first token "
               f"{metrics['ttft_ratio']:.2f}x FP32's, {metrics['size_ratio']:.2f}x smaller, perplexity "
               f"{chosen.perplexity:.3f} ({100 * metrics['ppl_increase']:+.1f}%)")
    search.notes.append(verdict)
    parted = _agreement_note(search, chosen)
    if parted:
        search.notes.append(parted)
    raised = _raised(chosen.scheme) if chosen.scheme is not None and chosen.scheme.bits == 4 else []
    if raised:
        search.notes.append("kept at higher precision, by measured sensitivity (most sensitive first in the bar chart): "
                            + ", ".join(raised))
    if chosen.scheme is not None and chosen.scheme.fine:
        search.notes.append(f"blocks of {chosen.scheme.fine_block} (for the weights, and for the int8 activations their "
                            f"kernels quantize) on {', '.join(chosen.scheme.fine)}, where they lowered the measured "
                            f"perplexity (bar chart); blocks of {chosen.scheme.block_size} elsewhere")
    for note in search.notes:
        console.info(note)
    return StepResult(artifact=artifact.derive("ptq", onnx_path=out / onnx_name(out)), metrics=metrics,
                      notes=search.notes, sections=_sections(search, chosen))


def _agreement_note(search: Search, chosen: Row) -> str | None:
    """Where the chosen candidate's greedy continuations part from FP32's much sooner than another candidate's
    within budget (AGREEMENT_GAP of the tokens or more), a note that says so: the budget reads perplexity, and a
    quantized decoder can keep its perplexity while its greedy text drifts (an INT4 one most of all)."""
    if chosen.scheme is None:
        return None
    others = [r for r in search.rows if r.within_budget and not r.outranked and r.agreement is not None]
    best = max(others, key=lambda r: r.agreement, default=chosen)
    if chosen.agreement is None or best.agreement - chosen.agreement < AGREEMENT_GAP:
        return None
    return (f"greedy agreement with FP32 (the share of {AGREEMENT_TOKENS} greedy tokens before the first "
            f"difference, {len(search.text.prompts)} prompts): {chosen.agreement:.2f} for the chosen {chosen.name}, "
            f"{best.agreement:.2f} for {best.name} ({100 * (best.perplexity / search.base.perplexity - 1):+.1f}% "
            "perplexity): the chosen model's text parts from FP32's sooner; the budget reads perplexity only "
            "(--max-ppl-increase)")


def _raised(scheme: WeightScheme) -> list[str]:
    kept = [f"embedding ({scheme.embedding})"] if scheme.embedding != "int4" else []
    kept += [f"lm_head ({scheme.lm_head})"] if scheme.bits == 4 and scheme.lm_head != "int4" else []
    return kept + [f"{g} (int8)" for g in scheme.raised]


def _metrics(search: Search, chosen: Row) -> dict[str, Any]:
    base = search.base
    return {
        "chosen": chosen.name, "quantized": chosen.scheme is not None,
        "perplexity": chosen.perplexity, "fp32_perplexity": base.perplexity,
        "ppl_increase": chosen.perplexity / base.perplexity - 1, "greedy_agreement": chosen.agreement,
        "decode_tokens_per_s": chosen.decode, "fp32_decode_tokens_per_s": base.decode,
        "decode_speedup": chosen.decode / chosen.base_decode if chosen.scheme is not None else 1.0,
        "ttft_ms": _ttft(chosen), "fp32_ttft_ms": _ttft(base),
        "ttft_ratio": _ttft(chosen) / _ttft(base) if _ttft(base) else None,
        "size_mb": chosen.size_mb, "fp32_size_mb": base.size_mb, "size_ratio": base.size_mb / chosen.size_mb,
        "peak_rss_mb": chosen.peak_rss_mb, "fp32_peak_rss_mb": base.peak_rss_mb,
        "candidates": len(search.rows), "budget": f"perplexity +{100 * search.s.max_ppl_increase:.1f}% at most, time to first token "
                  f"{search.s.max_ttft_ratio:g}x FP32's at most",
        "perplexity_windows": search.windows,
        "window": search.s.window,
    }


def _sections(search: Search, chosen: Row) -> list[Any]:
    from mlopt.core.sections import Bars, Table

    base = search.base
    columns = ["model", "within budget", "perplexity", "ppl increase %", "95% interval %", "greedy agreement",
               "ttft p50 ms", "decode tokens/s", "decode speed-up", "size MB", "peak RSS MB", "set aside for its twin",
               "chosen"]
    rows = [[r.name, r.within_budget, round(r.perplexity, 4), round(100 * (r.perplexity / base.perplexity - 1), 2),
             _interval(r, base), None if r.agreement is None else round(r.agreement, 3), r.timing.get("ttft_ms", {}).get("p50"), round(r.decode, 2) if r.timing else None,
             round(r.decode / (r.base_decode or r.decode), 3) if r.timing else None, round(r.size_mb, 2),
             None if r.peak_rss_mb is None else round(r.peak_rss_mb, 1), r.outranked, r is chosen]
            for r in [base, *search.rows]]
    sections: list[Any] = [Table(title="decoder PTQ candidates (weight-only)", columns=columns, rows=rows,
                                 note=f"budget: {search.s.max_ppl_increase:.0%} perplexity over FP32 on "
                                      f"{search.s.window}-token windows of the held-out text (95% interval: "
                                      "paired over the windows; candidates whose intervals overlap are not told apart "
                                      "by this text); greedy agreement and peak RSS (a fresh process each): not measured for a candidate slower "
                                      "than FP32; timing: "
                                      f"{search.s.prompt_tokens}-token prompt, {search.s.new_tokens} new tokens, "
                                      f"{search.s.rounds} interleaved rounds for FP32 and the candidates within budget "
                                      "that decoded faster than FP32 in one round (the choice reads only these, and keeps "
                                      f"none whose time to first token is over {search.s.max_ttft_ratio:g}x FP32's); "
                                      "one round beside FP32 for the others; speed-ups against FP32 in the same rounds")]
    if search.refinement:
        sections.append(Bars(title="perplexity recovered by finer blocks for one role of the layers' MatMuls",
                             labels=[r["role"] for r in search.refinement],
                             series={"perplexity recovered": [r["perplexity_recovered"] for r in search.refinement]}))
    if search.sensitivity:
        sections.append(Bars(title="weight-group sensitivity (perplexity recovered by raising the group alone)",
                             labels=[s["group"] for s in search.sensitivity],
                             series={"perplexity recovered": [s["perplexity_recovered"] for s in search.sensitivity]}))
    return sections
