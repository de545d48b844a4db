"""Model cards: the README.md in every model directory xft writes (Hugging Face model-card format).

A card says what the model is (dense SFT, MoE, EWA-averaged, merged), how it
was made (base model, data, key settings, steps, final loss) and how to load
it. Guarantee: an MoE card never describes the checkpoint as loadable by plain
`transformers` — its FFNs are xft modules, so it names `xft.load`; a dense
card names `AutoModelForCausalLM.from_pretrained`, which needs no xft.

The YAML front matter carries `library_name`, `base_model` (only when it is a
Hub id: a local path there would fail the Hub's validation), `tags` and
`pipeline_tag`. `base_model_of` reads a card back, so a model made from an xft
output names the original base (a Hub id, or a local model's absolute path),
not the intermediate directory. Local paths in a card are absolute: a card
read from another directory (or by `base_model_of`) means what it says.
"""

from __future__ import annotations

import json
import os

from xft.artifacts import HUB_ID

CARD = "README.md"
_BASE_LINE = "- base model: `"  # how the body names the base model (base_model_of reads it back)

# What an MoE's config.json says to tools without xft ("xft_note"), and what its card says. Plain transformers
# refuses the model type `xft_moe` with advice to upgrade transformers, which cannot help; the card is what
# a user (or the Hub page) shows beside that error.
MOE_NOTE = ("an xft Mixture-of-Experts checkpoint: load it with xft.load(path) (pip install xft), "
            "or merge it into a dense model with `xft merge`")

# kind -> (is an MoE, what it is)
KINDS = {
    "upcycled": (True, "an XFT mixture-of-experts (MoE) model upcycled from a dense model: every FFN became "
                       "a shared expert plus routed experts, copied from the dense FFN (not yet trained)"),
    "moe": (True, "an XFT mixture-of-experts (MoE) model (shared expert + routed experts), "
                  "instruction-tuned"),
    "dense": (False, "a dense model, instruction-tuned (supervised fine-tuning)"),
    "ewa": (False, "a dense model: an MoE trained with EWA (Experts Weights Averaging), its experts averaged "
                   "into one FFN per layer"),
    "merged": (False, "a dense model merged from an XFT mixture-of-experts model: every FFN is computed from "
                      "the experts' FFNs (a weighted sum, or a merge of their weights such as TIES)"),
}


def write_model_card(directory: str, *, kind: str, base_model: str | None = None, source: str | None = None,
                     data: str | None = None, settings: dict | None = None, results: dict | None = None,
                     details: str | None = None, location: str | None = None) -> str:
    """Write `directory`/README.md describing the model there; return its path.

    kind: one of `KINDS` (upcycled, moe, dense, ewa, merged); decides the loader shown.
    base_model: the original base model (a Hub id goes into the front matter).
    source: the model this one was made from directly, when not the base (e.g. the trained MoE).
    data: the training data; settings: key settings (name -> value); results: e.g. steps, final loss;
    details: one more paragraph (e.g. how a merge weighed the experts).
    location: the path the load example shows (default `directory`; e.g. the final path when the
    card is written into a temporary directory that is renamed afterwards).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model card kind {kind!r}; choose one of {', '.join(KINDS)}")
    is_moe, what = KINDS[kind]
    base_model, source, data = _local(base_model), _local(source), _local(data)
    location = os.path.abspath(location or directory)
    path = os.path.join(directory, CARD)
    with open(path, "w", encoding="utf-8") as f:
        f.write(_front_matter(kind, is_moe, base_model))
        f.write(_body(location, is_moe, what, base_model, source, data, settings, results,
                      details))
    return path


def base_model_of(model: str) -> str:
    """The original base of `model`: the `base_model` of its card if xft wrote that card, else `model` itself."""
    try:
        with open(os.path.join(model, CARD), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return model
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    if "- xft" not in front.splitlines():  # another tool's card: its base_model is *its* base, not this model
        return model
    for line in front.splitlines():
        if line.startswith("base_model:"):
            value = line.split(":", 1)[1].strip()
            try:
                return json.loads(value)
            except ValueError:
                return value
    # A local base is not in the front matter (the Hub wants ids there): the body names it.
    for line in text.splitlines():
        if line.startswith(_BASE_LINE) and line.endswith("`"):
            return line[len(_BASE_LINE):-1]
    return model


def _local(name: str | None) -> str | None:
    """`name` as a card shows it: a local path made absolute (the caller's directory is not the reader's); a
    Hub id as it is."""
    return os.path.abspath(name) if name and os.path.exists(name) else name


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repo id ("owner/name", as the Hub's base_model field wants it)."""
    return bool(name) and "/" in name and bool(HUB_ID.fullmatch(name)) and not os.path.exists(name)


def _front_matter(kind: str, is_moe: bool, base_model: str | None) -> str:
    tags = ["xft", "code"] + (["moe", "mixture-of-experts"] if is_moe else []) + (
        ["merge"] if kind in ("merged", "ewa") else [])
    # JSON strings are valid YAML scalars: names with ':' or '#' stay intact.
    lines = ["---", f"library_name: {'xft' if is_moe else 'transformers'}"]
    if is_hub_id(base_model):
        lines.append(f"base_model: {json.dumps(base_model)}")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    if not is_moe:
        lines.append("pipeline_tag: text-generation")
    return "\n".join(lines + ["---", ""]) + "\n"


def _body(directory, is_moe, what, base_model, source, data, settings, results, details) -> str:
    name = os.path.basename(os.path.normpath(directory))
    out = [f"# {name}", "", f"This is {what}, made with xft (XFT: upcycle a dense code LLM into an MoE, "
           "instruction-tune it, merge it back into a dense model).", ""]
    if details:
        out += [details, ""]
    made = []
    if base_model:
        made.append(f"{_BASE_LINE}{base_model}`")
    if source and source != base_model:
        made.append(f"- made from: `{source}`")
    if data:
        made.append(f"- training data: `{data}`")
    made += [f"- {k}: {_value(v)}" for k, v in (settings or {}).items() if v is not None]
    made += [f"- {k}: {_value(v)}" for k, v in (results or {}).items() if v is not None]
    if made:
        out += ["## How it was made", ""] + made + [""]
    out += ["## How to load it", ""]
    if is_moe:
        out += [f"This is {MOE_NOTE}. Plain `transformers` does not load it (its FFNs are xft modules): it "
                "says that it does not recognize the model type `xft_moe` and suggests upgrading transformers, "
                "which does not help. Load it with xft (or `import xft` first: the Auto classes then load it "
                "too):", "", "```python", "import xft", "",
                f'model = xft.load("{directory}")', "```", "",
                "`xft merge` turns it into a dense model of the base architecture, which plain "
                "`transformers` loads.", ""]
    else:
        out += ["A plain dense model of the base architecture; no xft needed:", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{directory}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{directory}")', "```", ""]
    return "\n".join(out)


def _value(v) -> str:
    return f"{v:.5g}" if isinstance(v, float) else f"`{v}`" if isinstance(v, str) else str(v)
