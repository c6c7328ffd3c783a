"""Report prose: tables as data (``Section``), rendered to Markdown and LaTeX from the same cells (so both
carry the same numbers); the ablation and saliency sections in ``ablation.py`` and ``saliency.py``."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "−": "$-$", "–": "--", "—": "---", "<": r"$<$",
                  ">": r"$>$", "[": "[", "]": "]"}


@dataclass
class Section:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def render_markdown(sections: list[Section], footer: list[str]) -> str:
    lines = []
    for sec in sections:
        lines += [f"### {sec.title}", "", "| " + " | ".join(sec.headers) + " |",
                  "|" + "---|" * len(sec.headers)]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in sec.rows]
        lines += [""] + [f"{n}" for n in sec.notes] + ([""] if sec.notes else [])
    return "\n".join(lines + footer + [""])


def _tex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


LATEX_PREAMBLE = ["% Tables written by radacx-cache. In your preamble: \\usepackage{booktabs} (\\toprule, \\midrule,",
                  "% \\bottomrule). Each table is a float with its caption; \\input{table1.tex} where it belongs."]


def _caption(title: str) -> str:
    """A section title as a LaTeX caption: LaTeX numbers tables itself, so a leading "Table 1:" goes."""
    return re.sub(r"^Table \d+:\s*", "", title)


def render_latex(sections: list[Section], footer: list[str]) -> str:
    """One ``table`` environment (booktabs) per section; notes and footer as table notes."""
    out = list(LATEX_PREAMBLE)
    for sec in sections:
        out += [r"\begin{table}[ht]", r"\centering", r"\small", f"\\caption{{{_tex(_caption(sec.title))}}}",
                r"\begin{tabular}{" + "l" * 2 + "c" * (len(sec.headers) - 2) + "}", r"\toprule",
                " & ".join(_tex(h) for h in sec.headers) + r" \\", r"\midrule"]
        out += [" & ".join(_tex(c) for c in row) + r" \\" for row in sec.rows]
        out += [r"\bottomrule", r"\end{tabular}"]
        out += [r"\par\footnotesize " + _tex(n) for n in sec.notes]
        out += [r"\end{table}", ""]
    out += [r"\noindent\footnotesize " + _tex(line) + r"\par" for line in footer]
    return "\n".join(out) + "\n"
