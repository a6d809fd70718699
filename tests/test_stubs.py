"""The type stubs' docstrings match the native module's (so editors show the real docs)."""

from __future__ import annotations

import ast
import inspect
import typing

import pytest

import kvmpy
import kvmpy._native as native

from .support import ROOT


def words(text: str) -> str:
    return " ".join(text.split())


def test_stub_docstrings_match_the_runtime() -> None:
    tree = ast.parse((ROOT / "python" / "kvmpy" / "_native.pyi").read_text())
    checked = 0
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(native, node.name)
        stub_doc = ast.get_docstring(node)
        if stub_doc is not None:
            assert words(stub_doc) == words(inspect.cleandoc(cls.__doc__)), node.name
            checked += 1
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and ast.get_docstring(item) is not None:
                member = cls.__dict__[item.name]
                if isinstance(member, staticmethod):
                    member = member.__func__
                runtime = inspect.cleandoc(member.__doc__)
                assert words(ast.get_docstring(item) or "") == words(runtime), (
                    f"{node.name}.{item.name}"
                )
                checked += 1
    assert checked > 100


@pytest.mark.kvm
def test_stats_has_the_keys_its_type_promises() -> None:
    with kvmpy.Vm() as vm:
        stats = vm.create_vcpu().stats()
    assert set(stats) == set(typing.get_type_hints(kvmpy.VcpuStats))
    assert all(isinstance(v, int) for v in stats.values())
