"""`import padd.kernels` is light: it runs `padd/__init__.py` first, which must import neither
transformers (nor through it yaml and tqdm) nor matplotlib nor the training program, and still
`import padd` makes `experts_implementation="padd"` valid in transformers, in either import order.
Each case runs in a fresh interpreter, where `sys.modules` shows what an import really pulled in."""

import json
import subprocess
import sys

# What `padd.kernels` must not pull in: the heavy libraries and padd's training program.
HEAVY = ("matplotlib", "yaml", "tqdm", "transformers")
PROGRAM = ("padd.cli", "padd.config", "padd.pipeline", "padd.training", "padd.decompress", "padd.moe")


def _fresh(code: str) -> dict:
    """Run `code` in a new interpreter; it prints one JSON value, returned here."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_padd_kernels_pulls_in_no_heavy_library_and_no_program():
    loaded = _fresh(
        "import json, sys\n"
        "import torch\n"
        "after_torch = set(sys.modules)\n"
        "import padd.kernels\n"
        "print(json.dumps({'torch': sorted(after_torch), 'kernels': sorted(sys.modules)}))\n"
    )
    added = set(loaded["kernels"]) - set(loaded["torch"])
    # torch itself imports tqdm when it is installed (torch.hub): padd must not add any of them
    bad = sorted(m for m in added if m.split(".")[0] in HEAVY or m.startswith(PROGRAM))
    assert not bad, bad
    assert "padd.kernels" in added and "padd.kernels.routing" in added  # the check sees real imports
    assert not {"matplotlib", "yaml", "transformers"} & set(loaded["kernels"])


def test_import_padd_registers_the_experts_implementation_once_transformers_loads():
    registered = _fresh(
        "import json, sys\n"
        "import padd\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import PreTrainedModel\n"
        "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
        "from padd.moe.hf_experts import padd_experts_forward\n"
        "loader = type(sys.modules['transformers.modeling_utils'].__loader__).__name__\n"
        "print(json.dumps([ALL_EXPERTS_FUNCTIONS.get('padd') is padd_experts_forward,\n"
        "    getattr(PreTrainedModel.post_init, '_padd_checked', False), loader]))\n"
    )
    assert registered == [True, True, "SourceFileLoader"]  # and transformers' module looks untouched


def test_import_padd_after_transformers_registers_at_once():
    registered = _fresh(
        "import json, sys\n"
        "import transformers.modeling_utils\n"
        "import padd\n"
        "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
        "hooks = [type(f).__name__ for f in sys.meta_path if type(f).__module__ == 'padd.hf_registration']\n"
        "print(json.dumps(['padd' in ALL_EXPERTS_FUNCTIONS.valid_keys(), hooks]))\n"
    )
    assert registered == [True, []]


def test_public_names_load_on_first_use():
    names = _fresh(
        "import json, sys\n"
        "import padd\n"
        "lazy = 'padd.moe' not in sys.modules and 'padd.decompress' not in sys.modules\n"
        "print(json.dumps([lazy, padd.MoE.__name__, padd.RoutingControl.__name__,\n"
        "    padd.decompress.__name__, padd.flops.__name__, 'MoE' in dir(padd), padd.__version__]))\n"
    )
    assert names == [True, "MoE", "RoutingControl", "padd.decompress", "padd.flops", True, "0.1.0"]
