"""The package's shape: no import circles (between modules, or between its folders), the files
shipped inside a Hugging Face export stand alone, every command-line main lives in tools/ (or the
entry script) and reports user errors the same way."""

import ast
import importlib
import json
import subprocess
import sys
from collections import defaultdict

import pytest

from tests.support.processes import REPO_ROOT
from tests.support.tiny_model import TINY

PACKAGE = "megatron_hypermoe"


def package_modules():
    """{module name: path} for every module of the package."""
    modules = {}
    for path in sorted((REPO_ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(path, name, modules):
    """The package modules ``name`` imports, at any depth of its code (lazy imports count)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != PACKAGE:
                found.add(target)
    return found


def import_graph():
    modules = package_modules()
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def circles(graph):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def folder_of(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert len(graph) > 30 and graph["megatron_hypermoe.training.trainer"]
    assert circles(graph) == []


def test_the_folders_form_layers():
    """Folder A imports folder B and B imports A would make them one room: they do not."""
    graph = defaultdict(set)
    for module, imports in import_graph().items():
        for target in imports:
            if folder_of(target) != folder_of(module):
                graph[folder_of(module)].add(folder_of(target))
    assert circles(graph) == []
    # The direction the architecture promises.
    assert "training" not in graph["model"] and "training" not in graph["parallel"]
    assert "conversion" not in graph["inference"] and "inference" not in graph["conversion"]


SHIPPED_HF_IMPORTS = {"math", "torch", "torch.nn", "torch.nn.functional", "transformers",
                      "transformers.cache_utils", "transformers.modeling_outputs"}


def test_files_shipped_in_an_export_import_only_torch_and_transformers():
    from megatron_hypermoe.conversion.export import HF_FILES_DIRECTORY, REMOTE_CODE_FILES

    for name in REMOTE_CODE_FILES:
        tree = ast.parse((REPO_ROOT / HF_FILES_DIRECTORY / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert {a.name for a in node.names} <= SHIPPED_HF_IMPORTS, (name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 or node.module in SHIPPED_HF_IMPORTS, (name, node.lineno)


def test_files_shipped_in_an_export_load_with_the_package_off_the_path(tmp_path):
    import shutil

    from megatron_hypermoe.conversion.export import HF_FILES_DIRECTORY, REMOTE_CODE_FILES

    export = tmp_path / "export"
    export.mkdir()
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(f"{HF_FILES_DIRECTORY}/{name}", export / name)
    sizes = {k: v for k, v in TINY.items() if k.startswith("hyper_")}
    (export / "config.json").write_text(json.dumps(dict(
        model_type="hypermoe", architectures=["HyperMoeForCausalLM"],
        auto_map={"AutoConfig": "configuration_hypermoe.HyperMoeConfig",
                  "AutoModelForCausalLM": "modeling_hypermoe.HyperMoeForCausalLM"},
        vocab_size=32, hidden_size=TINY["hidden_size"], intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_local_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, **sizes)))
    script = (
        "import sys\n"
        f"sys.modules[{PACKAGE!r}] = None  # importing the package now fails\n"
        "import torch\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        f"config = AutoConfig.from_pretrained({str(export)!r}, trust_remote_code=True)\n"
        "model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)\n"
        "print(tuple(model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape))\n")
    environment = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                   "HF_MODULES_CACHE": str(tmp_path / "modules"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "(1, 3, 32)"


def test_every_main_is_a_tool_and_reports_user_errors_in_one_line():
    for name, path in package_modules().items():
        functions = {node.name for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.FunctionDef)}
        assert "main" not in functions, f"{name} has a main(): move it to tools/"
    tools = sorted(p.stem for p in (REPO_ROOT / "tools").glob("*.py") if p.stem != "__init__")
    assert len(tools) >= 9
    for tool in tools + ["pretrain_gpt_hypermoe"]:
        module = importlib.import_module(tool if tool == "pretrain_gpt_hypermoe"
                                         else f"tools.{tool}")
        assert module.main.__name__ == "main" and hasattr(module.main, "__wrapped__"), tool
        assert "sys.path" not in (REPO_ROOT / module.__file__).read_text(), tool


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["evaluate.py", "convert_checkpoint_to_hf.py"])
def test_a_tool_turns_a_user_error_into_one_line_and_exit_1(tool, tmp_path):
    from tests.support.processes import run_tool

    rest = ["--input", tmp_path / "x.txt"] if tool == "evaluate.py" else \
        ["--output", tmp_path / "out"]
    result = run_tool(tool, "--load", tmp_path / "nothing", *rest, expect=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: --load {tmp_path / 'nothing'} does not exist"]
    assert "Traceback" not in result.stderr
