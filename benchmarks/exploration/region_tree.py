"""Probe: copy a patched Toto tree and insert the layer-region block after ``class TransformerLayer``.

Used before the layer-region patch existed, to measure nested compile regions on the GPU.

    python benchmarks/exploration/region_tree.py PATCHED_PARENT OUT_PARENT
"""
import shutil
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src / "toto", dst / "toto")
template = (Path(__file__).resolve().parents[2] / "totopatch/patches/layer_region_template.py.txt").read_text()
block = "\n\n" + template.replace("__LAYER_BASE__", "TransformerLayer")
path = dst / "toto/model/transformer.py"
text = path.read_text()
start = text.index("class TransformerLayer(")
end = text.index("\nclass ", start + 1)
path.write_text(text[:end].rstrip("\n") + "\n" + block + "\n" + text[end:])
print("region block inserted into", path)
