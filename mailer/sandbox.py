"""Jinja2's sandbox with bounds, so that no template can exhaust the process rendering it.

The sandbox keeps a template away from Python's internals; the bounds keep it away from
the process's memory and CPU wherever it renders (on save, in a preview, when sending):
the characters a part writes, the size of each value it builds and of all of them
together, loop iterations and macro calls, range(), the nesting of macros, the size of
integers and CPU time (MAILER['TEMPLATE_LIMITS']). Every operation that can grow a value
is intercepted, which also keeps Jinja from folding it while compiling, and a parsed
template is rewritten so that its loops, joins and literals pass through the budget.
Reaching a bound raises TemplateLimitExceeded naming it.

The environment has no loader: an include, import or extends names a database template
that ``rendering`` resolved and compiled beforehand, never a file.
"""

from __future__ import annotations

import re
import string
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

from jinja2 import Template, TemplateSyntaxError, nodes, pass_context
from jinja2.runtime import BlockReference, Context, LoopContext, Macro, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer
from markupsafe import escape

from . import conf
from .exceptions import TemplateError, TemplateLimitExceeded


@dataclass(frozen=True, slots=True)
class Limits:
    """MAILER['TEMPLATE_LIMITS'], read once per render."""

    output_chars: int
    memory_chars: int
    iterations: int
    range: int
    recursion: int
    include_depth: int
    number_bits: int
    cpu_seconds: float

    @classmethod
    def configured(cls) -> Limits:
        """The limits configured now; checked once per distinct setting (a render reads
        them, and checking costs more than the rest of a small render's overhead)."""
        key = tuple(conf.get("TEMPLATE_LIMITS").items())
        found = _configured.get(key)
        if found is None:
            values = conf.template_limits()
            found = cls(
                output_chars=values["OUTPUT_CHARS"],
                memory_chars=values["MEMORY_CHARS"],
                iterations=values["ITERATIONS"],
                range=values["RANGE"],
                recursion=values["RECURSION"],
                include_depth=values["INCLUDE_DEPTH"],
                number_bits=values["NUMBER_BITS"],
                cpu_seconds=float(values["CPU_SECONDS"]),
            )
            if len(_configured) > 16:
                _configured.clear()
            _configured[key] = found
        return found


_configured: dict[tuple, Limits] = {}


def exceeded(limit: str, message: str) -> TemplateLimitExceeded:
    """The error for a bound reached, naming the setting to raise if it was legitimate."""
    return TemplateLimitExceeded(f"{message} (TEMPLATE_LIMITS {limit}).", limit=limit)


class Budget:
    """What one render of one part has used so far; every hook below charges it."""

    __slots__ = (
        "limits", "partials", "small", "written", "made", "steps", "depth", "ticks", "deadline",
    )  # fmt: skip

    def __init__(self, limits: Limits, partials: Mapping[str, Any] | None = None):
        self.limits = limits
        self.partials = partials or {}
        self.small = min(_SMALL, limits.output_chars)  # charged without the checks
        self.written = self.made = self.steps = self.depth = 0
        self.ticks = 127  # the first tick starts the clock: a plain template never reads it
        self.deadline = 0.0

    def tick(self) -> None:
        """One operation; the CPU clock is read every 128 (a read costs a system call)."""
        self.ticks += 1
        if not self.ticks & 127:
            self.clock()

    def clock(self) -> None:
        now = time.thread_time()
        if self.ticks == 128:
            self.deadline = now + self.limits.cpu_seconds
        elif now > self.deadline:
            raise exceeded("CPU_SECONDS", f"took more than {self.limits.cpu_seconds:g} s of CPU")

    def step(self) -> None:
        """One loop iteration or macro call."""
        self.steps += 1
        if self.steps > self.limits.iterations:
            raise self.too_many_steps()
        self.tick()

    def too_many_steps(self) -> TemplateLimitExceeded:
        return exceeded(
            "ITERATIONS", f"ran more than {self.limits.iterations} loop iterations and macro calls"
        )

    def enter(self) -> None:
        """A call of a macro, of a block (``self.name()``, ``super()``) or of a recursive loop,
        nested in the ones running."""
        self.step()
        if self.depth >= self.limits.recursion:
            raise exceeded(
                "RECURSION",
                "nested macro or block calls or recursive loops more than "
                f"{self.limits.recursion} deep",
            )
        self.depth += 1

    def keep(self, chars: int) -> None:
        """Characters a macro or block writes into its buffer (the output counts them again
        if they reach it)."""
        self.made += chars
        if self.made > self.limits.memory_chars:
            raise exceeded(
                "MEMORY_CHARS", f"built more than {self.limits.memory_chars} characters of values"
            )

    def too_much_output(self) -> TemplateLimitExceeded:
        return exceeded("OUTPUT_CHARS", f"wrote more than {self.limits.output_chars} characters")

    def room(self) -> int:
        """The largest value that may still be built."""
        return min(self.limits.output_chars, self.limits.memory_chars - self.made)

    def refuse(self, projected: int, what: str) -> None:
        """Refuse to build a value of ``projected`` characters, before building it."""
        if projected > self.limits.output_chars:
            raise exceeded(
                "OUTPUT_CHARS",
                f"{what} would build a value of more than {self.limits.output_chars} characters",
            )
        if self.made + projected > self.limits.memory_chars:
            raise exceeded(
                "MEMORY_CHARS",
                f"{what} would build more than {self.limits.memory_chars} characters of values",
            )

    def charge(self, value: Any, what: str) -> Any:
        """Count a value the template built; refuse it if it is too large."""
        if isinstance(value, str):
            size = len(value)
            if size <= self.small:  # nearly always: skip the checks of a large one
                self.made += size
                if self.made <= self.limits.memory_chars:
                    return value
        elif isinstance(value, int):
            if value.bit_length() > self.limits.number_bits:
                raise exceeded(
                    "NUMBER_BITS",
                    f"{what} made an integer of more than {self.limits.number_bits} bits",
                )
            return value
        elif value is None or isinstance(value, float):
            return value
        else:
            size = measure(value, self.limits.output_chars)
        self.refuse(size, what)
        self.made += size
        return value

    def iterate(self, iterable: Iterable) -> Iterator:
        """The items of a loop, each one a step (what step() does, inline: loops are the
        most frequent operation of all)."""
        limit = self.limits.iterations
        for item in iterable:
            self.steps += 1
            if self.steps > limit:
                raise self.too_many_steps()
            self.ticks += 1
            if not self.ticks & 127:
                self.clock()
            yield item


#: A string this short is charged without the checks, unless OUTPUT_CHARS is shorter.
_SMALL = 4096


class _Active(threading.local):
    budget: Budget | None = None


_active = _Active()


def current() -> Budget:
    """The budget of the render running on this thread (a fresh one outside renders)."""
    return _active.budget or Budget(Limits.configured())


#: Output chunks joined at a time before counting: counting each one would cost a tenth
#: of a small render. A chunk is one value, so a render stops at most this many values
#: past OUTPUT_CHARS.
_CHUNKS = 32


def render(template: Template, context: Mapping[str, Any], budget: Budget) -> str:
    """Render within the budget, counting the output as it streams: a template that writes
    too much stops there instead of after the process has held all of it."""
    previous = _active.budget
    _active.budget = budget
    chunks = template.root_render_func(template.new_context(context))
    try:
        parts: list[str] = []
        limit = budget.limits.output_chars
        while batch := list(islice(chunks, _CHUNKS)):
            part = "".join(batch)
            budget.written += len(part)
            if budget.written > limit:
                raise budget.too_much_output()
            parts.append(part)
        return "".join(parts)
    finally:
        chunks.close()
        _active.budget = previous


def measure(value: Any, limit: int) -> int:
    """About the characters ``str(value)`` takes, a shared item counted wherever it appears
    (as str() repeats it); counting stops past ``limit``."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, float | range) or item is None:
            total += 24
        elif isinstance(item, Namespace):
            total += 14
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        elif isinstance(item, Mapping):  # the abstract checks last: they are slow
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, Collection):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        else:
            total += 8
    return total


# --- Checks before an operation that can grow a value ---------------------------------------

_FORMATTER = string.Formatter()
_DIGITS = re.compile(r"\d+")
_PERCENT = re.compile(
    r"%(?:\([^)]*\))?[#0\- +]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d+))?[hlL]?(?P<conv>.)"
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int)


def _number(digits: str) -> int:
    return int(digits) if len(digits) < 10 else 10**10


def _formatted_size(
    fmt: str, fields: int, widest: int, reprs: bool, values: list, room: int
) -> int:
    longest = max((measure(value, room) for value in values), default=0)
    return len(fmt) + fields * (widest + longest * (10 if reprs else 1))


def _format_size(fmt: str, args: tuple, kwargs: dict, room: int) -> int:
    """The most characters ``fmt.format(*args, **kwargs)`` can make."""
    fields = widest = 0
    nested = reprs = False
    try:
        parsed = list(_FORMATTER.parse(fmt))
    except ValueError:
        return len(fmt)  # the call itself refuses it
    for _text, name, spec, conversion in parsed:
        if name is None:
            continue
        fields += 1
        if spec:
            nested = nested or "{" in spec
            widest = max([widest, *map(_number, _DIGITS.findall(spec))])
        reprs = reprs or conversion in ("r", "a")
    values = [*args, *kwargs.values()]
    if nested:  # a width taken from an argument
        widest = max([widest, *(abs(v) for v in values if _is_int(v))])
    return _formatted_size(fmt, fields, widest, reprs, values, room)


def _percent_size(fmt: str, operand: Any, room: int) -> int:
    """The most characters ``fmt % operand`` can make."""
    fields = widest = 0
    stars = reprs = False
    for spec in _PERCENT.finditer(fmt):
        fields += 1
        for part in (spec.group("width"), spec.group("precision")):
            if part == "*":
                stars = True
            elif part:
                widest = max(widest, _number(part))
        reprs = reprs or spec.group("conv") in ("r", "a")
    if isinstance(operand, Mapping):
        values = list(operand.values())
    elif isinstance(operand, tuple):
        values = list(operand)
    else:
        values = [operand]
    if stars:
        widest = max([widest, *(abs(v) for v in values if _is_int(v))])
    return _formatted_size(fmt, fields, widest, reprs, values, room)


def _check_binop(budget: Budget, operator: str, left: Any, right: Any) -> None:
    bits = budget.limits.number_bits
    if operator == "**":
        if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            if (abs(left).bit_length() - 1) * right >= bits:
                raise exceeded("NUMBER_BITS", f"** would make an integer of more than {bits} bits")
    elif operator == "*":
        if _is_int(left) and _is_int(right):
            if left.bit_length() + right.bit_length() > bits + 1:
                raise exceeded("NUMBER_BITS", f"* would make an integer of more than {bits} bits")
            return
        sequence, times = (left, right) if _is_int(right) else (right, left)
        if _is_int(times) and times > 0 and isinstance(sequence, str | bytes | list | tuple):
            budget.refuse(measure(sequence, budget.room()) * times, "repeating a value with *")
    elif operator == "%" and isinstance(left, str | bytes):
        fmt = left.decode("latin-1") if isinstance(left, bytes) else left
        budget.refuse(_percent_size(fmt, right, budget.room()), "formatting with %")


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _check_method(budget: Budget, owner: Any, name: str, args: tuple, kwargs: dict) -> tuple:
    """Methods of str, bytes and int that can build a value far larger than their inputs."""
    room = budget.room()
    what = f"{name}()"
    if name == "join":
        items = list(args[0]) if args else []
        budget.refuse(measure(items, room) + len(owner) * len(items), what)
        return (items, *args[1:])
    if name in ("ljust", "rjust", "center", "zfill"):
        width = _arg(args, kwargs, 0, "width")
        if _is_int(width):
            budget.refuse(width, what)
    elif name == "expandtabs":
        size = _arg(args, kwargs, 0, "tabsize", 8)
        if _is_int(size):
            budget.refuse(
                len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * size, what
            )
    elif name == "replace":
        old, new = _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new")
        count = _arg(args, kwargs, 2, "count", -1)
        if isinstance(old, str | bytes) and isinstance(new, str | bytes):
            hits = owner.count(old) if old else len(owner) + 1
            if _is_int(count) and count >= 0:
                hits = min(hits, count)
            budget.refuse(len(owner) + hits * max(0, len(new) - len(old)), what)
    elif name == "format":
        budget.refuse(_format_size(owner, args, kwargs, room), what)
    elif name == "format_map":
        mapping = args[0] if args and isinstance(args[0], Mapping) else {}
        budget.refuse(_format_size(owner, (), dict(mapping), room), what)
    elif name == "translate":
        table = args[0] if args else None
        if isinstance(table, Mapping):
            widest = max((measure(v, room) for v in table.values()), default=1)
            budget.refuse(len(owner) * max(1, widest), what)
    elif name == "to_bytes":
        length = _arg(args, kwargs, 0, "length", 1)
        if _is_int(length):
            budget.refuse(length, what)
    return args


_GROWING_METHODS = frozenset(
    {
        "join", "ljust", "rjust", "center", "zfill", "expandtabs", "replace", "format",
        "format_map", "translate", "to_bytes",
    }
)  # fmt: skip


def _growing_method(obj: Any) -> tuple[Any, str] | None:
    name = getattr(obj, "__name__", None)
    if name not in _GROWING_METHODS:
        return None
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner = getattr(target, "__self__", None)
    if isinstance(owner, str | bytes | int):
        return owner, name
    return None


# Filters that can build a value far larger than their input: check before running them.


def _check_width_filter(budget: Budget, args: tuple, kwargs: dict) -> tuple:  # center
    width = _arg(args, kwargs, 1, "width", 80)
    if _is_int(width):
        budget.refuse(width, "the center filter")
    return args


def _check_indent(budget: Budget, args: tuple, kwargs: dict) -> tuple:
    text, width = str(args[0]) if args else "", _arg(args, kwargs, 1, "width", 4)
    step = width if _is_int(width) else len(str(width))
    budget.refuse(len(text) + (text.count("\n") + 1) * step, "the indent filter")
    return args


def _check_replace(budget: Budget, args: tuple, kwargs: dict) -> tuple:
    text = args[0] if args else ""
    old, new = _arg(args, kwargs, 1, "old"), _arg(args, kwargs, 2, "new")
    count = _arg(args, kwargs, 3, "count")
    if isinstance(old, str) and isinstance(new, str):
        text = str(text)
        hits = text.count(old) if old else len(text) + 1
        if _is_int(count) and count >= 0:
            hits = min(hits, count)
        budget.refuse(len(text) + hits * max(0, len(new) - len(old)), "the replace filter")
    return args


def _check_format(budget: Budget, args: tuple, kwargs: dict) -> tuple:
    if args and isinstance(args[0], str):
        operand = kwargs or tuple(args[1:])
        budget.refuse(_percent_size(args[0], operand, budget.room()), "the format filter")
    return args


def _check_join(budget: Budget, args: tuple, kwargs: dict) -> tuple:
    if not args:
        return args
    items = list(args[0])
    separator = str(_arg(args, kwargs, 1, "d", ""))
    budget.refuse(measure(items, budget.room()) + len(separator) * len(items), "the join filter")
    return (items, *args[1:])


def _check_count(name: str, index: int, keyword: str) -> Callable[[Budget, tuple, dict], tuple]:
    def check(budget: Budget, args: tuple, kwargs: dict) -> tuple:  # batch, slice: padding
        count = _arg(args, kwargs, index, keyword)
        if _is_int(count):
            budget.refuse(count, f"the {name} filter")
        return args

    return check


def _check_wordwrap(budget: Budget, args: tuple, kwargs: dict) -> tuple:
    text, width = str(args[0]) if args else "", _arg(args, kwargs, 1, "width", 79)
    wrap = _arg(args, kwargs, 3, "wrapstring") or "\n"
    if _is_int(width) and isinstance(wrap, str):
        lines = len(text) // max(1, width) + 1
        budget.refuse(len(text) + lines * len(wrap), "the wordwrap filter")
    return args


_FILTER_CHECKS: dict[str, Callable[[Budget, tuple, dict], tuple]] = {
    "center": _check_width_filter,
    "indent": _check_indent,
    "replace": _check_replace,
    "format": _check_format,
    "join": _check_join,
    "batch": _check_count("batch", 1, "linecount"),
    "slice": _check_count("slice", 1, "slices"),
    "wordwrap": _check_wordwrap,
}


def _bounded_filter(name: str, func: Callable) -> Callable:
    """The filter, checked before it runs and its result charged; a filter that takes the
    context is never folded while compiling, so nothing runs unbounded then either."""
    kind = getattr(getattr(func, "jinja_pass_arg", None), "name", None)
    check = _FILTER_CHECKS.get(name)
    what = f"the {name} filter"
    first: Callable[[Context], tuple] = {
        "context": lambda context: (context,),
        "eval_context": lambda context: (context.eval_ctx,),
        "environment": lambda context: (context.environment,),
    }.get(kind, lambda context: ())

    if kind is None and check is None:  # most filters: the shortest path

        @pass_context
        def bounded(context: Context, *args: Any, **kwargs: Any) -> Any:
            budget = _active.budget or current()
            budget.tick()
            return budget.charge(func(*args, **kwargs), what)

    else:

        @pass_context
        def bounded(context: Context, *args: Any, **kwargs: Any) -> Any:
            budget = _active.budget or current()
            budget.tick()
            if check is not None:
                args = check(budget, args, kwargs)
            return budget.charge(func(*first(context), *args, **kwargs), what)

    bounded.__name__ = bounded.__qualname__ = f"bounded_{name}"
    bounded.__doc__ = func.__doc__
    return bounded


# --- Globals ----------------------------------------------------------------------------------


def _range(*args: int) -> range:
    budget = current()
    items = range(*args)
    try:
        size = len(items)
    except OverflowError:
        size = budget.limits.range + 1
    if size > budget.limits.range:
        raise exceeded("RANGE", f"range() of more than {budget.limits.range} items")
    return items


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    if _is_int(n) and _is_int(max):
        current().refuse(n * max * 12, "lipsum()")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


class BoundedNamespace(Namespace):
    """namespace(): an attribute set again in every iteration of a loop cannot grow past the
    largest value a template may build."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        budget = current()
        attributes = object.__getattribute__(self, "_Namespace__attrs")
        budget.refuse(measure(attributes, budget.limits.output_chars), "a namespace")


# --- Filters the rewritten template calls -----------------------------------------------------

LOOP, WRITE, CONCAT, VALUE, PARTIAL = (
    "mailer:loop", "mailer:write", "mailer:concat", "mailer:value", "mailer:partial",
)  # fmt: skip  # ':' cannot appear in a filter name a template writes


@pass_context
def _loop(context: Context, iterable: Iterable) -> Iterator:
    return (_active.budget or current()).iterate(iterable)


@pass_context
def _write(context: Context, value: Any) -> str:
    """What a macro or block writes, counted before it is kept in the macro's buffer."""
    text = escape(value) if context.eval_ctx.autoescape else str(value)
    current().keep(len(text))
    return text


@pass_context
def _concat(context: Context, items: list) -> str:
    budget = _active.budget or current()
    budget.tick()
    room = budget.room()
    size = 0
    for item in items:
        size += len(item) if isinstance(item, str) else measure(item, room)
    budget.refuse(size, "joining with ~")
    joined = markup_join(items) if context.eval_ctx.autoescape else str_join(items)
    budget.made += len(joined)
    return joined


@pass_context
def _value(context: Context, value: Any) -> Any:
    return current().charge(value, "a list or dict")


@pass_context
def _partial(context: Context, key: str) -> Any:
    try:
        return current().partials[key]
    except KeyError:
        raise TemplateError(f"The included template {key!r} was not compiled.") from None


class _Bound(NodeTransformer):
    """Rewrites a parsed template so that the budget sees what it does: each loop's items,
    each ~ and each list or dict built, what macros, call blocks, {% set %} and
    {% filter %} blocks write before it reaches the output; and an include, import or
    extends names the database template ``resolve`` compiled for it."""

    def __init__(self, resolve: Callable[[str, int], str] | None, count_all: bool):
        self.resolve = resolve
        self.buffered = 1 if count_all else 0

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = _filter(node.iter, LOOP)
        return node

    def _buffered(self, node: nodes.Node) -> nodes.Node:
        self.buffered += 1
        try:
            return self.generic_visit(node)
        finally:
            self.buffered -= 1

    visit_Macro = visit_CallBlock = visit_AssignBlock = visit_FilterBlock = _buffered

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        node = self.generic_visit(node)
        if self.buffered:
            node.nodes = [_filter(child, WRITE) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return _filter(nodes.List(node.nodes, lineno=node.lineno), CONCAT)

    def _literal(self, node: nodes.List | nodes.Tuple | nodes.Dict) -> nodes.Node:
        node = self.generic_visit(node)
        if getattr(node, "ctx", "load") != "load":
            return node
        parts = []
        for item in node.items:
            parts.extend((item.key, item.value) if isinstance(item, nodes.Pair) else (item,))
        if all(isinstance(part, nodes.Const) for part in parts):
            return node  # no larger than the source
        return _filter(node, VALUE)

    visit_List = visit_Tuple = visit_Dict = _literal

    def _other_template(self, node: nodes.Stmt) -> nodes.Node:  # include, import, extends
        name = node.template
        if self.resolve is None:
            raise TemplateSyntaxError("may not include, import or extend a template.", node.lineno)
        if not (isinstance(name, nodes.Const) and isinstance(name.value, str)):
            raise TemplateSyntaxError(
                "include, import and extends name a template by its slug in quotes.", node.lineno
            )
        node.template = _filter(nodes.Const(self.resolve(name.value, node.lineno)), PARTIAL)
        return self.generic_visit(node)

    visit_Include = visit_Import = visit_FromImport = visit_Extends = _other_template


def _filter(node: nodes.Expr, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every way to grow a value or spin charged to a budget."""

    intercepted_binops = frozenset(ImmutableSandboxedEnvironment.default_binop_table)

    def __init__(self, **options: Any):
        super().__init__(auto_reload=False, **options)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters.update(
            {LOOP: _loop, WRITE: _write, CONCAT: _concat, VALUE: _value, PARTIAL: _partial}
        )
        self.globals.update(range=_range, lipsum=_lipsum, namespace=BoundedNamespace)

    def bounded(
        self,
        source: str,
        *,
        resolve: Callable[[str, int], str] | None = None,
        count_all: bool = False,
    ) -> Template:
        """Parse and compile ``source`` rewritten for the budget. ``resolve`` turns the slug
        an include names into a compiled partial's key (None: including is refused);
        ``count_all``: count everything written, as for a template included in a macro."""
        tree = self.parse(source)
        tree = _Bound(resolve, count_all).visit(tree)
        tree.set_environment(self)
        return self.from_string(tree)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _active.budget or current()
        budget.tick()
        _check_binop(budget, operator, left, right)
        return budget.charge(self.binop_table[operator](left, right), operator)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _active.budget or current()
        if isinstance(__obj, Macro | LoopContext | BlockReference):  # may recurse
            if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive loop
                args = (budget.iterate(args[0]), *args[1:])
            budget.enter()
            try:
                result = super().call(__context, __obj, *args, **kwargs)
            finally:
                budget.depth -= 1
            return budget.charge(result, "a macro")
        budget.tick()
        method = _growing_method(__obj)
        if method is not None:
            args = _check_method(budget, *method, args, kwargs)
        return budget.charge(super().call(__context, __obj, *args, **kwargs), "a call")
