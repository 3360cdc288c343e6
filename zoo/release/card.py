"""The model card of a release: `README.md` (huggingface_hub `ModelCard`) and a KV-cache plot.

The YAML front matter carries the Hub's metadata (license inherited from the base, `base_model`,
`library_name`, `pipeline_tag`, tags, `model-index` with the MLA model's perplexity) and a
`mla_zoo:` mapping that `mla-zoo list` reads back through `list_models(cardData=True)`:
version, d_kv, KV-cache bytes and reduction, perplexity of base and MLA.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from mla_zoo.modeling.convert_schema import ConversionReport
from mla_zoo.zoo.evaluate import EvalComparison, SuiteReport

from .gates import GateResult

TAGS = ["mla", "mha2mla", "kv-cache-compression", "custom_code", "mla-zoo"]
PLOT = "kv_cache.png"
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
GIB = 1024**3
SERVE_DTYPE = "bfloat16"  # the dtype models are served in: the card's KV-cache figures are in it
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CITATION = """\
@article{ji2025mha2mla,
  title   = {Towards Economical Inference: Enabling DeepSeek's Multi-Head Latent Attention
             in Any Transformer-based LLMs},
  author  = {Ji, Tao and Guo, Bin and Wu, Yuanbin and Guo, Qipeng and Shen, Lixing and Chen, Zhan
             and Qiu, Xipeng and Zhang, Qi and Gui, Tao},
  journal = {arXiv preprint arXiv:2502.14837},
  year    = {2025}
}

@article{deepseekv2,
  title   = {DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model},
  author  = {{DeepSeek-AI}},
  journal = {arXiv preprint arXiv:2405.04434},
  year    = {2024}
}"""


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def contexts(max_positions: int) -> list[int]:
    found = [c for c in CONTEXTS if c <= max_positions]
    return found if max_positions in found else [*found, max_positions]


def serving_kv_bytes(conversion: ConversionReport) -> tuple[int, int]:
    """KV-cache bytes per token (all layers), base and MLA, in SERVE_DTYPE, whatever dtype the weights are in."""
    kv = conversion.kv_cache
    scale = DTYPE_BYTES[SERVE_DTYPE] / DTYPE_BYTES[conversion.settings.dtype]
    return round(kv.bytes_per_token_before * scale), round(kv.bytes_per_token_after * scale)


def describe_data(path: str | Path | None) -> str | None:
    """What a data file is, as the SOURCES.md next to it says (its table row `| `name` | what it is | ...`)."""
    if path is None:
        return None
    path = Path(path)
    sources_md = path.parent / "SOURCES.md"
    if not sources_md.is_file():
        return None
    row = re.search(rf"^\|\s*`{re.escape(path.name)}`\s*\|([^|]+)\|", sources_md.read_text(encoding="utf-8"),
                    flags=re.MULTILINE)
    return row[1].strip() if row else None


def data_name(path: str | Path, description: str | None) -> str:
    """How the card names a data file: its name and what it is, never a path of the build machine."""
    return f"`{Path(path).name}`" + (f" ({description})" if description else "")


def tested_transformers() -> dict[str, str | None]:
    """The transformers versions a release is tested on: mla-zoo's lower bound and the one installed now."""
    from packaging.requirements import Requirement

    lowest = None
    for text in importlib.metadata.requires("mla-zoo") or []:
        req = Requirement(text)
        if req.name == "transformers":
            lowest = next((spec.version for spec in req.specifier if spec.operator == ">="), None)
    return {"lowest": lowest, "built_with": importlib.metadata.version("transformers")}


def plot_kv_cache(path: Path, before: int, after: int, max_positions: int, title: str) -> None:
    """KV cache (GiB, batch 1) against context length, base vs MLA; a small deterministic PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [0, max_positions]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    try:
        ax.plot(x, [0, before * max_positions / GIB], label="base (MHA/GQA)", color="#888888", linewidth=2)
        ax.plot(x, [0, after * max_positions / GIB], label="MLA", color="#d6336c", linewidth=2)
        ax.fill_between(x, [0, after * max_positions / GIB], [0, before * max_positions / GIB],
                        color="#d6336c", alpha=0.08, label=f"saved: {100 * (1 - after / before):.1f}%")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("KV cache (GiB, batch 1)")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, max_positions)
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)


def zoo_metadata(recipe, conversion: ConversionReport, metrics: EvalComparison, finetuned: bool, onnx: bool) -> dict:
    s, kv = conversion.settings, conversion.kv_cache
    before, after = serving_kv_bytes(conversion)
    return {
        "version": recipe.release.version,
        "name": recipe.release.name,
        "recipe": recipe.name,
        "d_kv": s.kv_rank_per_head,
        "kv_lora_rank": s.kv_lora_rank,
        "rope_pairs": s.rope_pairs,
        "rope_strategy": s.rope_strategy,
        "svd": s.svd,
        "dtype": s.dtype,
        "kv_dtype": SERVE_DTYPE,
        "kv_bytes_per_token_base": before,
        "kv_bytes_per_token_mla": after,
        "kv_reduction": round(kv.reduction, 6),
        "perplexity_base": round(metrics.base.perplexity, 4),
        "perplexity_mla": round(metrics.mla.perplexity, 4),
        "perplexity_delta": round(metrics.perplexity_delta, 6),
        "eval_text": Path(metrics.text).name,
        "finetuned": finetuned,
        "onnx": onnx,
    }


def card_data(recipe, metrics: EvalComparison, license: str, base_model: str | None, meta: dict) -> ModelCardData:
    text = Path(metrics.text).name
    return ModelCardData(
        license=license,
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=TAGS,
        model_name=recipe.release.name,
        eval_results=[
            EvalResult(task_type="text-generation", task_name="Language modelling", dataset_type="text",
                       dataset_name=text, metric_type="perplexity", metric_value=round(metrics.mla.perplexity, 4),
                       metric_name=f"Perplexity ({metrics.mla.tokens} tokens, seq_len {metrics.seq_len})"),
        ],
        mla_zoo=meta,
    )


def _kv_section(conversion: ConversionReport, max_positions: int) -> str:
    s, kv = conversion.settings, conversion.kv_cache
    before, after = serving_kv_bytes(conversion)
    rows = [
        "| context (tokens) | base | MLA | saved |",
        "|---:|---:|---:|---:|",
        f"| 1 (per token, all layers) | {human_bytes(before)} | {human_bytes(after)} | {human_bytes(before - after)} |",
    ]
    for n in contexts(max_positions):
        saved = human_bytes((before - after) * n)
        rows.append(f"| {n:,} | {human_bytes(before * n)} | {human_bytes(after * n)} | {saved} |")
    return "\n".join([
        "## KV-cache savings",
        "",
        f"Per token and layer the cache holds {kv.values_per_token_per_layer_after} values instead of "
        f"{kv.values_per_token_per_layer_before}: a latent of {s.kv_lora_rank} "
        f"({s.kv_rank_per_head} per KV head, the paper's d_kv) plus {2 * s.rope_pairs} RoPE dims per KV head. "
        f"In {SERVE_DTYPE} (the dtype models are served in), batch 1, that is "
        f"**{100 * kv.reduction:.2f}% less KV cache**:",
        "",
        *rows,
        "",
        f"![KV cache vs context length, base vs MLA]({PLOT})",
    ])


def _eval_section(metrics: EvalComparison, gates: list[GateResult], finetune: dict | None,
                  text: str, kv_bytes: tuple[int, int]) -> str:
    base, mla = metrics.base, metrics.mla
    lines = [
        "## Evaluation",
        "",
        f"Perplexity on {text} ({mla.tokens:,} tokens scored, windows of "
        f"{metrics.seq_len} tokens, {metrics.dtype}); lower is better. "
        + ("The MLA model was fine-tuned after conversion." if finetune is not None
           else "One-shot conversion: no fine-tuning after conversion."),
        "",
        "| model | perplexity | KV cache bytes / token |",
        "|---|---:|---:|",
        f"| base | {base.perplexity:.3f} | {kv_bytes[0]:,} |",
        f"| MLA (this model) | {mla.perplexity:.3f} ({100 * metrics.perplexity_delta:+.2f}%) | {kv_bytes[1]:,} |",
        "",
        f"(KV bytes in {SERVE_DTYPE}, all layers.)",
    ]
    if metrics.suite is not None:
        lines += ["", _suite_table(metrics.suite)]
    if gates:
        lines += ["", "Release gates:", "", "| gate | result | passed |", "|---|---|:-:|"]
        lines += [f"| `{g.gate}` | {g.text} | {'yes' if g.passed else 'no'} |" for g in gates]
    return "\n".join(lines)


def _suite_table(suite: SuiteReport) -> str:
    """The multi-domain suite (texts no recipe trains on), worst domain first, with the chat answers and
    the behaviour prompts."""
    lines = [
        f"Across domains (mla-zoo's evaluation suite, held out of every training set; at most "
        f"{suite.max_tokens or 'all'} tokens per domain, worst first):",
        "",
        "| domain | base perplexity | MLA perplexity | change | top-1 agreement with base |",
        "|---|---:|---:|---:|---:|",
        *[f"| {d.name} | {d.teacher_perplexity:.3f} | {d.perplexity:.3f} | {100 * d.perplexity_increase:+.1f}% "
          f"| {100 * d.top1_agreement:.1f}% |" for d in suite.domains],
    ]
    if suite.chat is not None:
        c = suite.chat
        lines += ["", f"Chat: on the base model's own answers to {c.prompts} held-out prompts, this model predicts "
                      f"the base's next token {100 * c.top1_agreement:.1f}% of the time (KL {c.kl:.3f} nats/token)."]
    if suite.behaviour:
        lost = [b.id for b in suite.behaviour if b.teacher_ok and not b.ok]
        lines += ["", f"Behaviour prompts: it keeps {suite.behaviour_kept} of the {suite.behaviour_scored} that the "
                      "base model answers right" + (f" (lost: {', '.join(lost)})." if lost else ".")]
    return "\n".join(lines)


def _usage_section(repo_id: str, tag: str, export: dict | None, transformers: dict[str, str | None]) -> str:
    tested = (f"transformers >= {transformers['lowest']} (the lowest mla-zoo supports) up to "
              if transformers["lowest"] else "transformers ")
    lines = [
        "## Usage",
        "",
        f"Tested on {tested}{transformers['built_with']} (installed when this release was built).",
        "",
        "The attention is custom code shipped in this repo (`modeling_llama_mla.py`), so loading needs "
        "`trust_remote_code=True`, the tokenizer's too (transformers reads the model's config to find it); pin "
        "`revision` to the release tag so the code you run cannot change under you.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'repo, revision = "{repo_id}", "{tag}"',
        "tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision, trust_remote_code=True)",
        "model = AutoModelForCausalLM.from_pretrained(repo, revision=revision, trust_remote_code=True)",
        'inputs = tokenizer("The key-value cache of this model", return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=40)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        "```",
        "",
        f"Or with the mla-zoo CLI: `mla-zoo pull {repo_id}@{tag}`.",
        "",
        "### onnxruntime",
        "",
    ]
    if export is None:
        lines.append("This release has no ONNX export (the recipe's `[export]` stage is disabled).")
        return "\n".join(lines)
    onnx_model = export.get("onnx_model", "model.onnx")
    kernel = export.get("kernel_library")
    lines += [
        "The ONNX graph in `onnx/` uses a fused MultiHeadLatentAttention op; register the mla-zoo kernel library "
        "with onnxruntime before creating the session.",
        "",
        "```python",
        "import onnxruntime as ort",
        "from huggingface_hub import snapshot_download",
        *([f"import {kernel.split('.')[0]}"] if kernel and "." in kernel else []),
        "",
        f'path = snapshot_download("{repo_id}", revision="{tag}", allow_patterns=["onnx/*"])',
        "options = ort.SessionOptions()",
        f"options.register_custom_ops_library({kernel or 'KERNEL_LIBRARY_PATH'})",
        f'session = ort.InferenceSession(f"{{path}}/onnx/{onnx_model}", options)',
        "```",
    ]
    return "\n".join(lines)


def _limitations(conversion: ConversionReport, finetune: dict | None, metrics: EvalComparison) -> str:
    lines = [
        "## Limitations",
        "",
        "- The conversion changes the attention of the base model: expect some loss of quality "
        + ("even after fine-tuning" if finetune is not None else "(this release is a one-shot conversion, "
           "without the fine-tuning that recovers most of it)")
        + ("; the figures above are perplexity and agreement with the base model on a few held-out texts, "
           "not a benchmark of downstream tasks." if metrics.suite is not None
           else "; the perplexity above is one small English text, not a benchmark suite."),
        "- It inherits the base model's biases, knowledge cut-off, languages and license.",
        "- Loading runs the remote code of this repo (`trust_remote_code=True`); review it and pin the revision.",
        "- KV-cache sizes are for the cache layout of the shipped code (latent + decoupled RoPE keys); "
        "other runtimes may store more.",
    ]
    lines += [f"- {w}" for w in conversion.warnings]
    return "\n".join(lines)


def _refit_text(conversion: ConversionReport) -> str:
    if not conversion.output_refit:
        return "the source's"
    before, after = conversion.mean_refit_errors()
    return (f"re-solved on the calibration tokens to reproduce the source's attention outputs (relative output "
            f"error per layer, mean: {before:.3f} -> {after:.3f})")


def _details(conversion: ConversionReport, calib_data: str | None) -> str:
    s, energy = conversion.settings, conversion.svd_retained_energy
    calib = conversion.calibration
    calib_text = ("none needed" if calib is None else
                  f"{calib.tokens} tokens of {calib_data or data_name(calib.file, None)}" if calib.kind == "text"
                  else f"{calib.tokens} tokens of the original's own samples (`mla-zoo synth-data`)"
                  if calib.kind == "synth-data" else f"{calib.tokens} tokens of the model's own samples")
    return "\n".join([
        "## Conversion",
        "",
        f"- source: `{conversion.source.name}` (weights sha256 `{conversion.source.sha256[:16]}…`)",
        f"- partial RoPE: {s.rope_pairs} frequency pairs kept per head, strategy `{s.rope_strategy}`",
        f"- low rank: `kv_lora_rank` {s.kv_lora_rank} ({s.kv_rank_per_head} per KV head), SVD `{s.svd}`; "
        f"energy kept per layer: mean {sum(energy) / len(energy):.4f}, min {min(energy):.4f}",
        f"- output projections: {_refit_text(conversion)}",
        f"- calibration: {calib_text}",
        f"- dtype: {s.dtype}; `conversion.json` in this repo has every detail.",
    ])


def render(recipe, conversion: ConversionReport, max_positions: int, license: str, base_model: str | None,
           metrics: EvalComparison, gates: list[GateResult], finetune: dict | None, export: dict | None) -> ModelCard:
    r = recipe.release
    meta = zoo_metadata(recipe, conversion, metrics, finetune is not None, export is not None)
    data = card_data(recipe, metrics, license, base_model, meta)
    base = base_model or conversion.source.name
    s, kv = conversion.settings, conversion.kv_cache
    intro = [
        f"# {r.name}",
        "",
        r.description or "",
        "",
        f"`{base}` with its attention converted to DeepSeek's **Multi-head Latent Attention** (MLA) by "
        "[MHA2MLA](https://arxiv.org/abs/2502.14837): each KV head keeps rotary position embeddings on a few "
        "frequency pairs only (partial RoPE), and the remaining keys and all values are compressed into one "
        "low-rank latent per token, the only thing the KV cache stores. "
        f"Here d_kv = {s.kv_rank_per_head}: the KV cache is {100 * kv.reduction:.1f}% smaller "
        f"and perplexity changes by {100 * metrics.perplexity_delta:+.1f}%.",
        "",
        f"Release `{r.tag}` of the mla-zoo model zoo (`mla-zoo list --org {r.repo_id.split('/')[0]}`), "
        f"built from the recipe `{recipe.name}` below.",
    ]
    calib = recipe.conversion.calib_text
    eval_text = recipe.eval.text or metrics.text
    body = "\n\n".join([
        "\n".join(intro),
        _kv_section(conversion, max_positions),
        _eval_section(metrics, gates, finetune, data_name(eval_text, describe_data(eval_text)),
                      serving_kv_bytes(conversion)),
        _usage_section(r.repo_id, r.tag, export, tested_transformers()),
        _details(conversion, calib and data_name(calib, describe_data(calib))),
        "## Recipe\n\nIts relative paths are relative to the recipe file's directory (for a shipped recipe, "
        "`zoo/recipes/` of the mla-zoo repository).\n\n```toml\n"
        + recipe.text.rstrip() + "\n```",
        _limitations(conversion, finetune, metrics),
        "## Citation\n\n```bibtex\n" + CITATION + "\n```",
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def write_card(out_dir: Path, *, recipe, conversion: ConversionReport, max_positions: int, license: str,
               base_model: str | None, metrics: EvalComparison, gates: list[GateResult], finetune: dict | None,
               export: dict | None) -> dict:
    """Write README.md and the plot into out_dir; returns the card stage's result."""
    out_dir = Path(out_dir)
    before, after = serving_kv_bytes(conversion)
    plot_kv_cache(out_dir / PLOT, before, after, max_positions, f"{recipe.release.name}: KV cache ({SERVE_DTYPE})")
    card = render(recipe, conversion, max_positions, license, base_model, metrics, gates, finetune, export)
    card.save(out_dir / "README.md")
    return {"files": ["README.md", PLOT], "mla_zoo": json.loads(json.dumps(card.data.to_dict()["mla_zoo"]))}
