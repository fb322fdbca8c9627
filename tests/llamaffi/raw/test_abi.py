"""ABI drift guard: the ctypes binding must agree with the pinned headers and the built libraries.

* Struct layouts: a C program generated from ``STRUCTS`` is compiled against the pinned headers
  and prints ``sizeof``, ``_Alignof`` and every field's ``offsetof``/``sizeof``; the numbers must
  equal what ctypes computes. The field names, in order, must also match the header's struct
  body, so that a field added into trailing padding (which changes no size) is still caught.
* Functions: every entry of ``DECLARED`` must be exported by the library file it was declared
  against (and defined there, not in one of its dependencies), and must have the argument count,
  the void-ness of its result and the by-value struct types of its ``LLAMA_API``/``GGML_API``
  prototype.
* The checkers are themselves tested on deliberately wrong declarations and structs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from llamaffi.errors import LibraryNotFoundError

try:
    import llamaffi._capi  # noqa: F401  (registers every declaration in DECLARED)
    from llamaffi._capi._types import STRUCTS
    from llamaffi._lib import DECLARED, Declaration, library_path
except LibraryNotFoundError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"libllama is not built: {exc}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[3]
VENDOR = ROOT / "vendor" / "llama.cpp"
VENDOR_INCLUDE_DIRS = (VENDOR / "include", VENDOR / "ggml" / "include")
LIB_HEADER_COPY = ROOT / "llamaffi" / "lib" / "llama.h"

# Macros that mark an exported function in llama.h, ggml.h, ggml-backend.h and friends.
API_MACROS = ("LLAMA_API", "GGML_API", "GGML_BACKEND_API")
# DEPRECATED(decl, hint) wraps a whole declaration: look inside it for the function.
WRAPPER_MACROS = frozenset({"DEPRECATED", "GGML_DEPRECATED"})
# Attribute-like macros that take arguments but are not the function.
ATTRIBUTE_MACROS = frozenset({"__attribute__", "__declspec", "GGML_ATTRIBUTE_FORMAT"})
# Words in a return type that do not change whether it is void.
RETURN_QUALIFIERS = frozenset({"const", "extern", "static", "inline", "GGML_NORETURN", "_Noreturn"})

_API_RE = re.compile(r"\b(?:" + "|".join(API_MACROS) + r")\b")
_IDENT_PAREN_RE = re.compile(r"([A-Za-z_]\w*)\s*\(")
_TOKEN_RE = re.compile(r"[A-Za-z_]\w*|\*")


# --------------------------------------------------------------------------- header parsing


@dataclass(frozen=True)
class Prototype:
    """One exported function as the header declares it."""

    name: str
    return_type: str
    params: tuple[str, ...]  # top-level parameters; ``(void)`` and ``()`` give ()
    variadic: bool
    filename: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.filename}:{self.line}"

    @property
    def returns_void(self) -> bool:
        tokens = [t for t in _TOKEN_RE.findall(self.return_type) if t not in RETURN_QUALIFIERS]
        return tokens == ["void"]


def strip_comments(text: str) -> str:
    """Blank out comments and preprocessor lines, keeping every newline (for line numbers).

    String literals are kept as they are, so a ``//`` inside a DEPRECATED hint is not a comment.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        two = text[i : i + 2]
        if two == "//":
            end = text.find("\n", i)
            end = n if end == -1 else end
            out.append(" " * (end - i))
            i = end
        elif two == "/*":
            end = text.find("*/", i + 2)
            end = n if end == -1 else end + 2
            out.append(re.sub(r"[^\n]", " ", text[i:end]))
            i = end
        elif text[i] in "\"'":
            end = _end_of_literal(text, i)
            out.append(text[i:end])
            i = end
        else:
            out.append(text[i])
            i += 1
    return _blank_preprocessor_lines("".join(out))


def _end_of_literal(text: str, start: int) -> int:
    quote = text[start]
    i = start + 1
    while i < len(text) and text[i] != quote and text[i] != "\n":
        i += 2 if text[i] == "\\" else 1
    return min(i + 1, len(text))


def _blank_preprocessor_lines(text: str) -> str:
    lines = text.split("\n")
    continued = False
    for k, line in enumerate(lines):
        if continued or line.lstrip().startswith("#"):
            continued = line.rstrip().endswith("\\")
            lines[k] = ""
    return "\n".join(lines)


def matching_close(text: str, open_pos: int) -> int:
    """Index of the bracket that closes the one at ``open_pos`` (``(`` or ``{``)."""
    opener = text[open_pos]
    closer = {"(": ")", "{": "}", "[": "]"}[opener]
    depth = 0
    for i in range(open_pos, len(text)):
        if text[i] == opener:
            depth += 1
        elif text[i] == closer:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {opener!r} at offset {open_pos}")


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside any (), [] or {} (function-pointer parameters stay whole)."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_params(inner: str) -> tuple[tuple[str, ...], bool]:
    """The parameters of a prototype's parameter list and whether it ends in ``...``."""
    params = [p for p in split_top_level(" ".join(inner.split())) if p]
    if params == ["void"]:
        params = []
    variadic = bool(params) and params[-1] == "..."
    if variadic:
        params.pop()
    return tuple(params), variadic


def parse_prototypes(text: str, filename: str) -> dict[str, Prototype]:
    """Every ``LLAMA_API``/``GGML_API`` function of a header, by name (comments ignored)."""
    clean = strip_comments(text)
    found: dict[str, Prototype] = {}
    for api in _API_RE.finditer(clean):
        proto = _prototype_after(clean, api.end(), filename)
        if proto is not None:
            found.setdefault(proto.name, proto)
    return found


def _prototype_after(clean: str, pos: int, filename: str) -> Prototype | None:
    type_parts: list[str] = []  # the return type, without wrapper and attribute macros
    while True:
        match = _IDENT_PAREN_RE.search(clean, pos)
        if match is None or re.search(r"[;{}]", clean[pos : match.start()]):
            return None  # an exported variable, or a macro definition: not a function
        ident = match.group(1)
        open_pos = match.end() - 1
        type_parts.append(clean[pos : match.start()])
        if ident in WRAPPER_MACROS:
            pos = match.end()
            continue
        close = matching_close(clean, open_pos)
        if ident in ATTRIBUTE_MACROS:
            pos = close + 1
            continue
        inner = clean[open_pos + 1 : close]
        return_type = " ".join(type_parts)
        if inner.lstrip().startswith("*"):
            # `T (*name(params))(...)`: a function returning a function pointer.
            nested = _IDENT_PAREN_RE.search(inner)
            if nested is None:
                return None
            ident = nested.group(1)
            nested_open = open_pos + 1 + nested.end() - 1
            inner = clean[nested_open + 1 : matching_close(clean, nested_open)]
            return_type = "void (*)()"
        params, variadic = parse_params(inner)
        line = clean.count("\n", 0, match.start()) + 1
        return_type = " ".join(return_type.split())
        return Prototype(ident, return_type, params, variadic, filename, line)


@dataclass(frozen=True)
class Headers:
    """The headers the binding is checked against."""

    include_dirs: tuple[Path, ...]
    files: tuple[Path, ...]
    complete: bool  # False: only the copy of llama.h in llamaffi/lib/ (no ggml headers)


@cache
def find_headers() -> Headers | None:
    vendor_headers = (VENDOR_INCLUDE_DIRS[0] / "llama.h", VENDOR_INCLUDE_DIRS[1] / "ggml.h")
    if all(path.is_file() for path in vendor_headers):
        files = tuple(sorted(p for d in VENDOR_INCLUDE_DIRS for p in d.glob("*.h")))
        return Headers(VENDOR_INCLUDE_DIRS, files, complete=True)
    if LIB_HEADER_COPY.is_file():
        return Headers((LIB_HEADER_COPY.parent,), (LIB_HEADER_COPY,), complete=False)
    return None


@cache
def header_texts(headers: Headers) -> dict[str, str]:
    """Each header's text, by file name."""
    return {path.name: path.read_text(errors="replace") for path in headers.files}


@cache
def header_prototypes(headers: Headers) -> dict[str, Prototype]:
    found: dict[str, Prototype] = {}
    for filename, text in header_texts(headers).items():
        for name, proto in parse_prototypes(text, filename).items():
            found.setdefault(name, proto)
    return found


def header_struct_fields(text: str, struct_name: str) -> list[str] | None:
    """Field names of ``struct struct_name { ... }`` in header order; anonymous unions flattened."""
    clean = strip_comments(text)
    match = re.search(r"\bstruct\s+" + re.escape(struct_name) + r"\s*\{", clean)
    if match is None:
        return None
    open_pos = match.end() - 1
    return _member_names(clean[open_pos + 1 : matching_close(clean, open_pos)])


def _member_names(body: str) -> list[str]:
    names: list[str] = []
    pos = 0
    while True:
        semi = body.find(";", pos)
        if semi == -1:
            return names
        brace = body.find("{", pos, semi)
        if brace == -1:
            names.extend(_declarator_names(body[pos:semi]))
            pos = semi + 1
            continue
        close = matching_close(body, brace)
        end = body.find(";", close)
        declarators = body[close + 1 : end].strip()
        inner = _member_names(body[brace + 1 : close])
        names.extend(_declarator_names("T " + declarators) if declarators else inner)
        pos = end + 1


def _declarator_names(member: str) -> list[str]:
    pointer_to_function = re.search(r"\(\s*\*\s*([A-Za-z_]\w*)\s*\)", member)
    if pointer_to_function:
        return [pointer_to_function.group(1)]
    names = []
    for part in split_top_level(member):
        bare = re.sub(r"\[[^\]]*\]|:\s*\d+\s*$", "", part)
        idents = re.findall(r"[A-Za-z_]\w*", bare)
        if idents:
            names.append(idents[-1])
    return names


# --------------------------------------------------------------------------- function checks


def _by_value_struct(c_text: str) -> str | None:
    """``X`` when ``c_text`` (a parameter or a return type) passes ``struct X`` by value."""
    tokens: list[str] = _TOKEN_RE.findall(c_text)
    if "*" in tokens or "(" in c_text:
        return None
    if "struct" in tokens:
        return tokens[tokens.index("struct") + 1]
    known = [t for t in tokens if t in STRUCTS]
    return known[0] if known else None


def _ctypes_struct_name(ctype: Any) -> str | None:
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure | ctypes.Union):
        return ctype.__name__
    return None


def check_declaration(decl: Declaration, proto: Prototype | None) -> list[str]:
    """Every way ``decl`` disagrees with its header prototype (empty: it agrees)."""
    if proto is None:
        return [f"{decl.name}: no {'/'.join(API_MACROS)} prototype in the headers"]
    problems = []
    c_sig = f"{proto.return_type} {proto.name}({', '.join(proto.params) or 'void'})"
    if len(decl.argtypes) != len(proto.params):
        problems.append(
            f"{decl.name}: the binding declares {len(decl.argtypes)} argument(s), "
            f"{proto.where} declares {len(proto.params)}: {c_sig}"
        )
    if proto.variadic:
        problems.append(f"{decl.name}: {proto.where} is variadic; ctypes cannot declare it")
    if proto.returns_void != (decl.restype is None):
        binding = "None" if decl.restype is None else getattr(decl.restype, "__name__", "?")
        problems.append(
            f"{decl.name}: restype is {binding}, {proto.where} returns '{proto.return_type}'"
        )
    pairs = [("result", proto.return_type, decl.restype)]
    # zip stops at the shorter list: a count mismatch is reported above.
    args = zip(proto.params, decl.argtypes, strict=False)
    pairs += [(f"argument {i}", c_text, ctype) for i, (c_text, ctype) in enumerate(args)]
    for what, c_text, ctype in pairs:
        c_struct = _by_value_struct(c_text)
        py_struct = _ctypes_struct_name(ctype)
        if c_struct != py_struct:
            binding = getattr(ctype, "__name__", repr(ctype))
            problems.append(
                f"{decl.name}: {what} is '{c_text}' in {proto.where} (by-value struct: "
                f"{c_struct}), the binding declares {binding} (by-value struct: {py_struct})"
            )
    return problems


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _defining_file(fn: Any) -> Path | None:
    """The shared object that defines ``fn`` (None where ``dladdr`` is not available)."""
    if sys.platform == "win32":
        return None
    dladdr = getattr(ctypes.CDLL(None), "dladdr", None)
    if dladdr is None:
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    dladdr.restype = ctypes.c_int
    info = _DlInfo()
    if not dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return None
    return Path(os.fsdecode(info.dli_fname))


def check_symbol(decl: Declaration, lib_dir: Path) -> str | None:
    """Why ``decl.name`` is not a function of ``decl.library`` in ``lib_dir`` (None: it is)."""
    path = lib_dir / decl.library
    if not path.is_file():
        return f"{decl.name}: declared against {decl.library}, which is not in {lib_dir}"
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)  # already loaded: the same handle
    try:
        fn = getattr(lib, decl.name)
    except AttributeError:
        return f"{decl.name}: not exported by {decl.library} (or its dependencies)"
    # dlsym on a handle also searches the library's dependencies; a symbol that resolves only
    # through them works by accident and breaks when the split between the libraries changes.
    owner = _defining_file(fn)
    if owner is not None and owner.resolve() != path.resolve():
        return f"{decl.name}: declared against {decl.library} but defined in {owner.name}"
    return None


# --------------------------------------------------------------------------- struct checks


@dataclass(frozen=True)
class FieldLayout:
    name: str
    offset: int
    size: int


def ctypes_fields(cls: type[ctypes.Structure | ctypes.Union]) -> Iterator[FieldLayout]:
    """The C-visible fields of ``cls``: members of an ``_anonymous_`` union replace the union."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ctype, *_ in cls._fields_:
        if name in anonymous and issubclass(ctype, ctypes.Structure | ctypes.Union):
            for member in ctypes_fields(ctype):
                descriptor = getattr(cls, member.name)  # offset within the outer struct
                yield FieldLayout(member.name, descriptor.offset, member.size)
        else:
            descriptor = getattr(cls, name)
            yield FieldLayout(name, descriptor.offset, descriptor.size)


def probe_source(structs: Mapping[str, type[ctypes.Structure]]) -> str:
    """A C program that prints the layout of every struct in ``structs``, one number a line."""
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "llama.h"', ""]
    lines.append("int main(void) {")
    for name, cls in structs.items():
        lines.append(f'    printf("size {name} %zu\\n", sizeof(struct {name}));')
        lines.append(f'    printf("align {name} %zu\\n", (size_t) _Alignof(struct {name}));')
        for field in ctypes_fields(cls):
            key = f"{name} {field.name}"
            lines.append(
                f'    printf("offset {key} %zu\\n", offsetof(struct {name}, {field.name}));'
            )
            lines.append(
                f'    printf("fsize {key} %zu\\n", sizeof(((struct {name} *) 0)->{field.name}));'
            )
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def parse_probe_output(stdout: str) -> dict[str, int]:
    """``{"offset llama_batch token": 8, ...}`` from the probe's output."""
    measured = {}
    for line in stdout.splitlines():
        key, _, value = line.rpartition(" ")
        measured[key] = int(value)
    return measured


def compare_layouts(
    structs: Mapping[str, type[ctypes.Structure]], measured: Mapping[str, int]
) -> list[str]:
    """Every difference between ctypes' layout of ``structs`` and the C compiler's."""
    problems = []
    for name, cls in structs.items():
        expected = {f"size {name}": ctypes.sizeof(cls), f"align {name}": ctypes.alignment(cls)}
        for field in ctypes_fields(cls):
            expected[f"offset {name} {field.name}"] = field.offset
            expected[f"fsize {name} {field.name}"] = field.size
        for key, py_value in expected.items():
            c_value = measured.get(key)
            if c_value != py_value:
                problems.append(f"{key}: C says {c_value}, ctypes says {py_value}")
    return problems


def compare_field_names(
    structs: Mapping[str, type[ctypes.Structure]], header_texts: Sequence[str]
) -> list[str]:
    """Every struct whose ctypes field names (in order) differ from its header declaration."""
    problems = []
    for name, cls in structs.items():
        in_header = None
        for text in header_texts:
            in_header = header_struct_fields(text, name)
            if in_header is not None:
                break
        in_ctypes = [f.name for f in ctypes_fields(cls)]
        if in_header is None:
            problems.append(f"struct {name}: no definition in the headers")
        elif in_header != in_ctypes:
            problems.append(f"struct {name}: header fields {in_header}, ctypes fields {in_ctypes}")
    return problems


def find_compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@pytest.fixture(scope="module")
def headers() -> Headers:
    found = find_headers()
    if found is None:
        pytest.skip(f"no llama.h: neither {VENDOR_INCLUDE_DIRS[0]} nor {LIB_HEADER_COPY} exists")
    return found


@pytest.fixture(scope="module")
def measured_layout(headers: Headers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What the C compiler says about every struct in STRUCTS (compiled once per module)."""
    compiler = find_compiler()
    if compiler is None:
        pytest.skip("no C compiler (cc, gcc, clang or $CC) to measure the structs with")
    work = tmp_path_factory.mktemp("abi")
    source = work / "abi_probe.c"
    source.write_text(probe_source(STRUCTS))
    exe = work / "abi_probe"
    cmd = [compiler, "-std=c11", "-O0", *(f"-I{d}" for d in headers.include_dirs)]
    build = subprocess.run(
        [*cmd, str(source), "-o", str(exe)], capture_output=True, text=True, timeout=60
    )
    if build.returncode != 0:
        # gcc: "fatal error: ggml.h: No such file", clang: "fatal error: 'ggml.h' file not found"
        missing = re.search(r"fatal error: '?([\w./-]+\.h)'?", build.stderr)
        if missing and not headers.complete:
            pytest.skip(
                f"the vendor tree {VENDOR} is missing and the llama.h copy in llamaffi/lib/ "
                f"needs {missing.group(1)}"
            )
        # A ctypes field the C struct does not have (a rename, a removal) fails here.
        pytest.fail(f"the ABI probe {source} does not compile:\n{build.stderr}")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True)
    return parse_probe_output(run.stdout)


# --------------------------------------------------------------------------- the guard


def test_struct_layouts_match_the_compiler(measured_layout: dict[str, int]) -> None:
    problems = compare_layouts(STRUCTS, measured_layout)
    assert not problems, "ctypes struct layouts differ from llama.h:\n" + "\n".join(problems)


def test_struct_field_names_match_the_header(headers: Headers) -> None:
    texts = list(header_texts(headers).values())
    problems = compare_field_names(STRUCTS, texts)
    assert not problems, "ctypes structs differ from llama.h:\n" + "\n".join(problems)


def test_every_declared_function_is_defined_in_its_library() -> None:
    lib_dir = library_path().parent
    problems = [p for d in DECLARED.values() if (p := check_symbol(d, lib_dir)) is not None]
    assert not problems, "declared functions missing from the libraries:\n" + "\n".join(problems)


def test_every_declaration_matches_its_prototype(headers: Headers) -> None:
    prototypes = header_prototypes(headers)
    problems = []
    for decl in DECLARED.values():
        if decl.name not in prototypes and _header_not_available(decl.name, headers):
            continue
        problems += check_declaration(decl, prototypes.get(decl.name))
    assert not problems, "declarations differ from the headers:\n" + "\n".join(problems)


def _header_not_available(name: str, headers: Headers) -> bool:
    # Only llama.h is copied into llamaffi/lib/; ggml's prototypes need the vendor tree.
    return not headers.complete and name.startswith("ggml_")


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_declared_name_is_a_header_declaration(name: str, headers: Headers) -> None:
    prototypes = header_prototypes(headers)
    if name not in prototypes and _header_not_available(name, headers):
        pytest.skip(f"{name} is declared in the ggml headers, and {VENDOR} is missing")
    word = re.compile(rf"\b{re.escape(name)}\s*\(")
    texts = header_texts(headers)
    mentioned = [filename for filename, text in texts.items() if word.search(text)]
    hint = f" (it appears only in comments or macros of {mentioned})" if mentioned else ""
    assert name in prototypes, f"{name} is not declared in any header{hint}"
    # The raw header line the parser reports names the function outside any // comment.
    proto = prototypes[name]
    raw_line = texts[proto.filename].splitlines()[proto.line - 1]
    assert word.search(raw_line.split("//")[0]), f"{proto.where}: {raw_line.strip()!r}"


# --------------------------------------------------------------------------- the guard's guard


def test_checker_flags_an_extra_argument(headers: Headers) -> None:
    real = DECLARED["llama_n_ctx"]
    proto = header_prototypes(headers)["llama_n_ctx"]
    assert check_declaration(real, proto) == []
    fake = dataclasses.replace(real, argtypes=(*real.argtypes, ctypes.c_int))
    problems = check_declaration(fake, proto)
    assert len(problems) == 1
    assert "2 argument(s)" in problems[0] and "declares 1" in problems[0]


def test_checker_flags_a_wrong_result_kind(headers: Headers) -> None:
    real = DECLARED["llama_backend_init"]
    proto = header_prototypes(headers)["llama_backend_init"]
    assert check_declaration(real, proto) == []
    problems = check_declaration(dataclasses.replace(real, restype=ctypes.c_int), proto)
    assert problems and "returns 'void'" in problems[0]


def test_checker_flags_a_wrong_by_value_struct(headers: Headers) -> None:
    real = DECLARED["llama_init_from_model"]
    proto = header_prototypes(headers)["llama_init_from_model"]
    assert check_declaration(real, proto) == []
    wrong = (real.argtypes[0], STRUCTS["llama_model_params"])
    problems = check_declaration(dataclasses.replace(real, argtypes=wrong), proto)
    assert problems and "llama_context_params params" in problems[0]


def test_checker_flags_an_undeclared_function(headers: Headers) -> None:
    fake = Declaration(library_path().name, "llama_no_such_function", (), None)
    assert check_declaration(fake, header_prototypes(headers).get(fake.name))
    assert check_symbol(fake, library_path().parent) is not None


def test_checker_flags_a_function_declared_against_the_wrong_library() -> None:
    lib_dir = library_path().parent
    real = DECLARED["ggml_type_name"]
    assert check_symbol(real, lib_dir) is None
    if _defining_file(ctypes.CDLL(str(lib_dir / real.library)).ggml_type_name) is None:
        pytest.skip("no dladdr: cannot tell which library defines a symbol")
    # libllama resolves ggml_type_name through its dependency on libggml-base.
    in_libllama = dataclasses.replace(real, library=library_path().name)
    problem = check_symbol(in_libllama, lib_dir)
    assert problem is not None and "defined in libggml-base" in problem


def test_layout_checker_flags_swapped_fields(
    measured_layout: dict[str, int], headers: Headers
) -> None:
    class llama_token_data(ctypes.Structure):  # C: id, logit, p
        _fields_ = [("logit", ctypes.c_float), ("id", ctypes.c_int32), ("p", ctypes.c_float)]

    fake = {"llama_token_data": llama_token_data}
    problems = compare_layouts(fake, measured_layout)
    assert sorted(problems) == [
        "offset llama_token_data id: C says 0, ctypes says 4",
        "offset llama_token_data logit: C says 4, ctypes says 0",
    ]
    texts = list(header_texts(headers).values())
    assert compare_field_names(fake, texts)


def test_layout_checker_flags_a_field_hidden_in_padding(headers: Headers) -> None:
    # Dropping a trailing bool leaves sizeof unchanged; only the header comparison sees it.
    real = STRUCTS["llama_model_params"]

    class llama_model_params(ctypes.Structure):
        _fields_ = real._fields_[:-1]

    assert ctypes.sizeof(llama_model_params) == ctypes.sizeof(real)
    texts = list(header_texts(headers).values())
    problems = compare_field_names({"llama_model_params": llama_model_params}, texts)
    assert len(problems) == 1 and "load_mtp" in problems[0]


HEADER_SNIPPET = """
#define LLAMA_API __attribute__ ((visibility ("default")))
    // LLAMA_API int llama_only_in_a_comment(int a);
    /* LLAMA_API int llama_in_a_block_comment(int a, int b); */
    LLAMA_API int32_t llama_multi_line(
            const struct llama_vocab * vocab,
                          const char * text,   // a comment, with a comma
                             int32_t   text_len);
    DEPRECATED(LLAMA_API void llama_old(struct llama_model * model),
            "use llama_new instead, (really)");
    LLAMA_API DEPRECATED(size_t llama_old_size(struct llama_context * ctx, int x),
            "use llama_state_get_size instead");
    LLAMA_API struct llama_sampler * llama_no_args(void);
    LLAMA_API void llama_callback(struct llama_context * ctx,
                                  bool (*cb)(void * data, int (*inner)(int, int)),
                                  int arr[static 4]);
    GGML_API void (*ggml_returns_fn(int a, int b))(int);
    GGML_API GGML_ATTRIBUTE_FORMAT(1, 2) void ggml_printf(const char * fmt, ...);
    GGML_API const int ggml_variable;
"""


def test_prototype_parser_handles_the_header_idioms() -> None:
    protos = parse_prototypes(HEADER_SNIPPET, "snippet.h")
    counts = {name: len(p.params) for name, p in protos.items()}
    assert counts == {
        "llama_multi_line": 3,
        "llama_old": 1,
        "llama_old_size": 2,
        "llama_no_args": 0,
        "llama_callback": 3,
        "ggml_returns_fn": 2,
        "ggml_printf": 1,
    }
    assert protos["llama_old"].returns_void
    assert not protos["llama_old_size"].returns_void
    assert not protos["llama_no_args"].returns_void
    assert not protos["ggml_returns_fn"].returns_void
    assert protos["ggml_printf"].variadic
    assert protos["llama_multi_line"].where == "snippet.h:5"


def test_struct_parser_flattens_anonymous_unions() -> None:
    text = """
    struct s {
        enum t tag;         // the tag; not a field: x
        char key[128];
        bool (*cb)(void * a, int b);
        union {
            int64_t i;
            char    str[16];
        };
        struct { int a; } named;
        int x, y : 3;
    };
    """
    assert header_struct_fields(text, "s") == ["tag", "key", "cb", "i", "str", "named", "x", "y"]
    assert header_struct_fields(text, "missing") is None
