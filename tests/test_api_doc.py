"""platform/gradalign/API.md names only what exists (the rules are stated at the top of API.md).

Every name in backticks of the form `gradalign.module.name[.attribute]`, `Class.attribute` (a public class of the
package) or `instance.attribute` (the instance names of `INSTANCES`) must exist: a module, a module attribute, or
an attribute of the class (a class attribute, a dataclass field, or a `self.x = ...` assignment in one of its
methods). Where the span writes a call, `name(a, b=1, ...)`, its parameters must be the callable's, in its order,
with the same literal defaults; without `...` every parameter must be listed.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import re
import textwrap
from pathlib import Path

import pytest

import gradalign

API_MD = Path(__file__).resolve().parents[1] / "platform" / "gradalign" / "API.md"

INSTANCES = {
    "trainer": "gradalign.training.Trainer",
    "config": "gradalign.config.TrainConfig",
    "dataset": "gradalign.data.Dataset",
    "comm": "gradalign.comm.LocalComm",
    "algorithm": "gradalign.algorithm_base.Algorithm",
    "space": "gradalign.ray_adapter.SearchSpace",
    "execution": "gradalign.ray_adapter.TrialExecution",
    "records": "gradalign.ray_adapter.TrialRecords",
    "connection": "gradalign.ray_adapter.RayConnection",
}
"""The instance names API.md may use, and their classes."""

_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_MISSING = object()


# -- what API.md names ------------------------------------------------------------------------------------------------
def code_spans(text: str) -> list[str]:
    """The backticked spans of a markdown text, whitespace (line breaks included) collapsed."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text)]


def checked_name(span: str) -> tuple[str, str | None] | None:
    """(dotted name, parameter text or None) of a span this test checks, else None.

    The span must start with the dotted name; a call's parameters are the text between its parentheses."""
    match = _DOTTED.match(span)
    if match is None:
        return None
    name, rest = match.group(), span[match.end() :]
    head = name.split(".")[0]
    if head != "gradalign" and head not in INSTANCES and not head[0].isupper():
        return None  # torch.distributed, model.parameters(), ...: not this package's names
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch in "([{"
            depth -= ch in ")]}"
            if depth == 0:
                return name, rest[1:i]
        raise AssertionError(f"unbalanced parentheses in `{span}`")
    return name, None


# -- what the code has ------------------------------------------------------------------------------------------------
def all_modules() -> list[str]:
    names = ["gradalign"]
    for info in pkgutil.walk_packages(gradalign.__path__, "gradalign."):
        names.append(info.name)
    return names


def public_classes() -> dict[str, type]:
    """Every public class defined in the package, by its bare name."""
    classes: dict[str, type] = {}
    for module_name in all_modules():
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and not name.startswith("_") and value.__module__.startswith("gradalign"):
                assert classes.setdefault(name, value) is value, f"two classes named {name}"
    return classes


def instance_attributes(cls: type) -> set[str]:
    """Names assigned as `self.x` anywhere in the methods of `cls` and its bases in the package."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("gradalign"):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        names.add(t.attr)
    return names


def class_attribute(cls: type, name: str):
    if hasattr(cls, name):
        return getattr(cls, name)
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return None
    if name in instance_attributes(cls):
        return None
    return _MISSING


def resolve(name: str, classes: dict[str, type]):
    """The object `name` stands for (None for an instance attribute: it exists, but has no value here)."""
    parts = name.split(".")
    if parts[0] == "gradalign":
        obj, i = importlib.import_module("gradalign"), 1
        while i < len(parts):  # the longest module prefix, then attributes
            try:
                obj, i = importlib.import_module(".".join(parts[: i + 1])), i + 1
            except ModuleNotFoundError:
                break
    elif parts[0] in INSTANCES:
        obj, i = resolve(INSTANCES[parts[0]], classes), 1
    else:
        obj, i = classes.get(parts[0], _MISSING), 1
        if obj is _MISSING:
            raise AssertionError(f"`{name}`: {parts[0]} is not a public class of the package")
    for part in parts[i:]:
        found = class_attribute(obj, part) if inspect.isclass(obj) else getattr(obj, part, _MISSING)
        if found is _MISSING:
            raise AssertionError(f"`{name}`: {part} does not exist")
        obj = found
    return obj


def split_parameters(text: str) -> list[str]:
    """Top-level comma-separated parts of a parameter list."""
    parts, depth, current, quote = [], 0, "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def check_call(name: str, obj, text: str) -> None:
    """The parameters written in `name(text)` are `obj`'s, in order, with its defaults."""
    signature = inspect.signature(obj)
    params = list(signature.parameters.values())
    method = "." in getattr(obj, "__qualname__", "") and not inspect.isclass(obj)
    if method and params and params[0].name in ("self", "cls"):
        params = params[1:]  # a method taken from its class: `self` is not written
    by_name = {p.name: p for p in params}
    written, partial = [], False
    for part in split_parameters(text):
        if part == "...":
            partial = True
            continue
        if part in ("*", "/"):  # keyword-only / positional-only markers
            kinds = {p.kind for p in params}
            want = inspect.Parameter.KEYWORD_ONLY if part == "*" else inspect.Parameter.POSITIONAL_ONLY
            assert want in kinds, f"`{name}({text})`: it has no {want.description} parameters"
            continue
        if part.startswith("**"):
            kinds = [p.kind for p in params]
            assert inspect.Parameter.VAR_KEYWORD in kinds, f"`{name}({text})`: it takes no {part}"
            written.append(next(p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD))
            continue
        pname, _, default = (s.strip() for s in part.partition("="))
        assert pname.isidentifier(), f"`{name}({text})`: {part!r} is not a parameter"
        assert pname in by_name, f"`{name}({text})`: no parameter {pname} (it has {', '.join(by_name) or 'none'})"
        if default:
            try:
                value = ast.literal_eval(default)
            except (ValueError, SyntaxError):
                value = _MISSING
            actual = by_name[pname].default
            if value is not _MISSING:
                assert actual is not inspect.Parameter.empty and actual == value, (
                    f"`{name}({text})`: {pname} defaults to {actual!r}, not {default}"
                )
        written.append(pname)
    order = [p.name for p in params if p.name in written]
    assert written == order, f"`{name}({text})`: the parameters are in the order {', '.join(order)}"
    if not partial:
        left_out = [p.name for p in params if p.name not in written]
        assert not left_out, f"`{name}({text})`: {', '.join(left_out)} left out (write `...` where that is meant)"


def checked_spans(text: str) -> list[tuple[str, str | None]]:
    return [found for span in code_spans(text) if (found := checked_name(span)) is not None]


def check(text: str) -> list[str]:
    """The problems of a markdown text's names ([] when every one exists)."""
    classes = public_classes()
    problems = []
    for name, call in checked_spans(text):
        try:
            obj = resolve(name, classes)
            if call is not None and obj is not None:
                check_call(name, obj, call)
        except AssertionError as err:
            problems.append(str(err))
    return problems


# -- tests ------------------------------------------------------------------------------------------------------------
def test_the_checker_reads_the_forms_it_should():
    spans = checked_spans(
        '`gradalign.data.load_dataset(name, data_dir="data",\n  ...)` `trainer.fit()` `Alignment.gns_simple` '
        "`model.parameters()` `torch.distributed` `Trainer` `python -m gradalign.cli`"
    )
    assert spans == [
        ("gradalign.data.load_dataset", 'name, data_dir="data", ...'),
        ("trainer.fit", ""),
        ("Alignment.gns_simple", None),
    ]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("`trainer.train_epoch()`", "train_epoch does not exist"),
        ("`trainer.epoch`", "epoch does not exist"),
        ("`gradalign.training.Trainer.nothing`", "nothing does not exist"),
        ("`gradalign.nomodule.x`", "nomodule does not exist"),
        ("`Nothing.x`", "Nothing is not a public class"),
        ("`gradalign.training.Trainer(config, comm=None)`", "device, dataset left out"),
        ("`gradalign.training.Trainer(comm=None, config, ...)`", "in the order config, comm"),
        ("`gradalign.training.Trainer(config, comm=1, ...)`", "comm defaults to None, not 1"),
        ("`gradalign.training.Trainer(config, cfg, ...)`", "no parameter cfg"),
    ],
)
def test_the_checker_finds_what_is_wrong(text, problem):
    problems = check(text)
    assert len(problems) == 1 and problem in problems[0], problems


def test_the_checker_accepts_what_exists():
    text = (
        "`gradalign.training.Trainer(config, comm=None, device=None, dataset=None)` `trainer.history` "
        "`trainer.total_updates` `config.extras` `gradalign.algorithms.GradAlign.fallback_reason` "
        "`gradalign.config.TrainConfig.replace(**changes)` `gradalign.ray_adapter.connect_ray(address=None, ...)`"
    )
    assert check(text) == []


def test_every_name_api_md_lists_exists():
    text = API_MD.read_text()
    assert len(checked_spans(text)) > 10  # (the page's names are being read)
    problems = check(text)
    assert not problems, "API.md names what the code does not have:\n" + "\n".join(problems)
