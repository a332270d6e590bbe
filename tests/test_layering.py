"""The library/application boundary: `import fastperc` and a loss call need torch and numpy only; the
application (fastperc.recipes) tells a user which extra to install when one is missing."""
import subprocess
import sys
import textwrap

# A meta-path finder that makes the application's dependencies unimportable, as on a machine where
# only `pip install fastperc` (torch + numpy) ran.
BLOCK = textwrap.dedent("""
    import importlib.abc, importlib.util, sys
    BLOCKED = {"scipy", "matplotlib", "mlxtend", "PIL", "tqdm", "sklearn"}

    class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # find_spec answers (torch probes optional modules with importlib.util.find_spec, which must not
        # raise); the import itself fails as a missing module does.
        def find_spec(self, name, path, target=None):
            return importlib.util.spec_from_loader(name, self) if name.split(".")[0] in BLOCKED else None

        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

        def exec_module(self, module):
            pass

    for mod in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
        del sys.modules[mod]
    sys.meta_path.insert(0, Block())
""")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_library_loss_works_without_the_application_dependencies():
    r = run_python("""
        import torch, fastperc
        from fastperc.models import UNet

        torch.manual_seed(0)
        model = UNet(block_channels=(8, 16))
        teacher = fastperc.FrozenTeacher(model, layers=["mid_block"])
        x0, noise = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
        t = torch.tensor([10, 500])
        sched = fastperc.NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=True)
        pred = model(sched.add_noise(x0, noise, t), t)
        loss = fastperc.self_perceptual_loss(teacher, pred, x0, noise, t, sched)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0
        app = sorted(m for m in sys.modules if m.startswith("fastperc.recipes"))
        assert not app, app
        print("LOSS_OK")
    """)
    assert r.returncode == 0 and "LOSS_OK" in r.stdout, r.stderr[-3000:]


def test_blocking_finder_really_blocks_the_application():
    # The test above proves nothing if the finder let scipy through: importing the metrics must fail.
    r = run_python("""
        try:
            import fastperc.recipes.metrics
        except ModuleNotFoundError as e:
            print("BLOCKED", e.name)
    """)
    assert "BLOCKED scipy" in r.stdout, (r.stdout, r.stderr[-2000:])


def test_cli_names_the_extra_to_install_when_a_dependency_is_missing():
    r = run_python("""
        from fastperc.recipes.cli import main
        sys.exit(main(["train-classifier", "--out", "unused"]))
    """)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pip install 'fastperc[train]'" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_cli_info_needs_no_application_dependency():
    r = run_python("""
        from fastperc.recipes.cli import main
        sys.exit(main(["info"]))
    """)
    assert r.returncode == 0 and "torch" in r.stdout, r.stderr[-2000:]


def test_library_modules_import_nothing_from_the_application():
    # Static check of the direction: no library module names fastperc.recipes in an import
    # (__main__.py is the command's entry point, `python -m fastperc`, which nothing imports).
    import ast
    import pathlib

    import fastperc
    root = pathlib.Path(fastperc.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "recipes" in path.relative_to(root).parts or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if "recipes" in n]
    assert not offenders, offenders
