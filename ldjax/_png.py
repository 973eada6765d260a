"""One way to write a figure: a 256-colour palette PNG, small enough for the repository."""

from __future__ import annotations

import io
import os
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_png(fig, path: str, dpi: int = 90, footer: str = "") -> str:
  """Writes ``fig`` to ``path`` (folders made as needed), with an optional small footer line
  (the command and machine that made it); closes the figure and returns ``path``."""
  from PIL import Image  # a matplotlib dependency

  if footer:
    width = max(40, int(fig.get_figwidth() * 21))   # characters per line at 6.5 pt
    fig.text(0.005, 0.003, textwrap.fill(footer, width), fontsize=6.5, color="#555555",
             ha="left", va="bottom")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  buf = io.BytesIO()
  fig.savefig(buf, dpi=dpi, format="png")
  plt.close(fig)
  buf.seek(0)
  with Image.open(buf) as im:
    im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
  return path
