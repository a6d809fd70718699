"""A griffe extension for the API reference (mkdocs.yml): griffe keeps the ``@overload``
signatures of a function only when an implementation follows them, and a type stub has
none, so ``Vm.on_io`` and the other handler registrations would vanish from the reference.
This makes each such function a member whose overloads are its signatures."""

from __future__ import annotations

from typing import Any

import griffe


class StubOverloads(griffe.Extension):
    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        for name, overloads in cls.overloads.items():
            if name in cls.members or not overloads:
                continue
            first = overloads[0]
            func = griffe.Function(
                name,
                lineno=first.lineno,
                endlineno=overloads[-1].endlineno,
                parameters=first.parameters,
                returns=first.returns,
                docstring=first.docstring,
            )
            func.overloads = list(overloads)
            cls.set_member(name, func)
