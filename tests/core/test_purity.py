"""agl_core imports no trainer library and no pluggy."""

import subprocess
import sys


def test_core_imports_no_trainer_library():
    code = (
        "import sys, agl_core, agl_core.config, agl_core.modules, agl_core.blocks\n"
        "import pkgutil, importlib\n"
        "for m in pkgutil.iter_modules(agl_core.__path__):\n"
        "    importlib.import_module('agl_core.' + m.name)\n"
        "bad = [n for n in ('transformers', 'trl', 'axolotl', 'pluggy', 'peft', 'accelerate', 'datasets')"
        " if n in sys.modules]\n"
        "print('BAD', bad)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BAD []" in out.stdout
