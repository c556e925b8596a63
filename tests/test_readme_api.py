"""The README's Python API block runs as written (in a fresh process, with a folder of photos beside it)."""
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import write_fashion_pngs

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_api_block_runs(tmp_path):
    text = README.read_text()
    section = text[text.index("## Python API"):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert "qs.build_session" in block and "qs.apply_bitconfig" in block
    write_fashion_pngs(tmp_path / "photos", 4)
    script = tmp_path / "api.py"
    script.write_text(block + "\nprint('front', len(front), 'points; run', len(run.front), 'points; index', index)\n")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))  # the latency table's cache stays here
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "front" in proc.stdout and (tmp_path / "runs" / "api" / "pareto.csv").is_file()
    assert (tmp_path / "runs" / "api" / "fastest.onnx").is_file() and (tmp_path / "cache" / "quantsearch").is_dir()
