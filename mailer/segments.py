"""Segments: rule sets over contacts compiled into one SQL query, never a Python loop."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from functools import reduce
from operator import and_, or_

from django.db.models import Case, Exists, FloatField, OuterRef, Q, QuerySet, When
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast
from django.db.models.lookups import GreaterThan, LessThan
from django.utils import timezone

from .exceptions import SegmentError
from .models import Campaign, Contact, Event, Segment, SegmentRule, Suppression

F, Op = SegmentRule.Field, SegmentRule.Operator

TEXT_OPS = {
    Op.EQUALS,
    Op.NOT_EQUALS,
    Op.CONTAINS,
    Op.NOT_CONTAINS,
    Op.STARTS_WITH,
    Op.ENDS_WITH,
    Op.IN,
    Op.NOT_IN,
    Op.IS_SET,
    Op.IS_NOT_SET,
}
#: Which operators each field takes; anything else is refused when the rule is saved.
OPERATORS: dict[str, set[str]] = {
    F.EMAIL: TEXT_OPS,
    F.NAME: TEXT_OPS,
    F.LANGUAGE: TEXT_OPS,
    F.TIMEZONE: TEXT_OPS,
    F.CONSENT: {Op.EQUALS, Op.NOT_EQUALS, Op.IN, Op.NOT_IN},
    F.VERIFIED: {Op.TRUE, Op.FALSE},
    F.SIGNUP: {Op.BEFORE, Op.AFTER, Op.WITHIN_DAYS, Op.OLDER_THAN_DAYS},
    F.TAG: {Op.EQUALS, Op.NOT_EQUALS, Op.IN, Op.NOT_IN},
    F.ATTRIBUTE: TEXT_OPS | {Op.GREATER, Op.LESS, Op.TRUE, Op.FALSE},
    F.OPENED_WITHIN: {Op.WITHIN_DAYS},
    F.CLICKED_WITHIN: {Op.WITHIN_DAYS},
    F.NEVER_OPENED: {Op.TRUE, Op.FALSE},
}
NO_VALUE = {Op.IS_SET, Op.IS_NOT_SET, Op.TRUE, Op.FALSE}
_ATTRIBUTE_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,99}$")
# A JSON number, or a string holding one (CSV imports store every value as a string).
_NUMERIC = r"^\s*-?[0-9]{1,250}(\.[0-9]{1,250})?\s*$"


def validate_rule(rule: SegmentRule) -> None:
    """Refuse a rule that cannot be evaluated, naming the field at fault."""
    if rule.field not in OPERATORS:
        raise SegmentError(f"Unknown field {rule.field!r}.", field="field")
    if rule.operator not in OPERATORS[rule.field]:
        allowed = ", ".join(sorted(OPERATORS[rule.field]))
        raise SegmentError(
            f"{rule.get_field_display()} does not take {rule.operator!r}; use one of: {allowed}.",
            field="operator",
        )
    if rule.field == F.ATTRIBUTE and (
        not _ATTRIBUTE_KEY.match(rule.attribute) or "__" in rule.attribute
    ):
        raise SegmentError(
            "Attribute keys start with a letter and use letters, digits, - and _.",
            field="attribute",
        )
    value = rule.value.strip()
    if rule.operator in NO_VALUE:
        return
    if not value:
        raise SegmentError("This rule needs a value.", field="value")
    if rule.operator in (Op.WITHIN_DAYS, Op.OLDER_THAN_DAYS) and not value.isdigit():
        raise SegmentError("Give a whole number of days.", field="value")
    if rule.operator in (Op.BEFORE, Op.AFTER):
        _date(value)
    if rule.operator in (Op.GREATER, Op.LESS):
        _number(value)
    if rule.field == F.CONSENT:
        bad = [v for v in _values(rule) if v not in Contact.Consent.values]
        if bad:
            raise SegmentError(
                f"Consent is one of {', '.join(Contact.Consent.values)}.", field="value"
            )


def _values(rule: SegmentRule) -> list[str]:
    if rule.operator in (Op.IN, Op.NOT_IN):
        return [v.strip() for v in rule.value.split(",") if v.strip()]
    return [rule.value.strip()]


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise SegmentError(f"{value!r} is not a date (YYYY-MM-DD).", field="value") from None


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise SegmentError(f"{value!r} is not a number.", field="value") from None


def _text_q(lookup: str, rule: SegmentRule) -> Q:
    values = _values(rule)
    op = rule.operator
    if op == Op.IS_SET:
        return ~Q(**{lookup: ""}) & Q(**{f"{lookup}__isnull": False})
    if op == Op.IS_NOT_SET:
        return Q(**{lookup: ""}) | Q(**{f"{lookup}__isnull": True})
    if op in (Op.IN, Op.NOT_IN):
        q = reduce(or_, (Q(**{f"{lookup}__iexact": v}) for v in values))
        return q if op == Op.IN else ~q
    suffix = {
        Op.EQUALS: "iexact",
        Op.NOT_EQUALS: "iexact",
        Op.CONTAINS: "icontains",
        Op.NOT_CONTAINS: "icontains",
        Op.STARTS_WITH: "istartswith",
        Op.ENDS_WITH: "iendswith",
    }[op]
    q = Q(**{f"{lookup}__{suffix}": values[0]})
    return ~q if op in (Op.NOT_EQUALS, Op.NOT_CONTAINS) else q


def _engaged(event_type: str, since: datetime | None) -> Exists:
    events = Event.objects.filter(
        recipient=OuterRef("email"), event_type=event_type, automated=False, campaign__isnull=False
    )
    if since is not None:
        events = events.filter(timestamp__gte=since)
    return Exists(events)


def rule_q(rule: SegmentRule, now: datetime | None = None) -> Q:
    """The rule as a Q over Contact."""
    validate_rule(rule)
    now = now or timezone.now()
    field, op, values = rule.field, rule.operator, _values(rule)
    if field in (F.EMAIL, F.NAME, F.LANGUAGE, F.TIMEZONE):
        return _text_q(field, rule)
    if field == F.CONSENT:
        q = Q(consent__in=values)
        return ~q if op in (Op.NOT_EQUALS, Op.NOT_IN) else q
    if field == F.VERIFIED:
        return Q(verified_at__isnull=op == Op.FALSE)
    if field == F.SIGNUP:
        if op == Op.BEFORE:
            return Q(created_at__date__lt=_date(values[0]))
        if op == Op.AFTER:
            return Q(created_at__date__gt=_date(values[0]))
        cutoff = now - timedelta(days=int(values[0]))
        return Q(created_at__gte=cutoff) if op == Op.WITHIN_DAYS else Q(created_at__lt=cutoff)
    if field == F.TAG:
        tagged = Exists(
            Contact.tags.through.objects.filter(
                contact_id=OuterRef("pk"), tag__name__in=[v.lower() for v in values]
            )
        )
        return Q(tagged) if op in (Op.EQUALS, Op.IN) else ~Q(tagged)
    if field == F.ATTRIBUTE:
        key = f"attributes__{rule.attribute}"
        if op == Op.IS_SET:
            return Q(attributes__has_key=rule.attribute)
        if op == Op.IS_NOT_SET:
            return ~Q(attributes__has_key=rule.attribute)
        if op in (Op.TRUE, Op.FALSE):
            return Q(**{key: op == Op.TRUE})
        if op in (Op.GREATER, Op.LESS):
            # Compare as numbers: jsonb would order any string below any number.
            number = Case(
                When(
                    **{f"{key}__regex": _NUMERIC},
                    then=Cast(KeyTextTransform(rule.attribute, "attributes"), FloatField()),
                ),
                output_field=FloatField(),
            )
            compare = GreaterThan if op == Op.GREATER else LessThan
            return Q(compare(number, _number(values[0])))
        return _text_q(key, rule)
    if field in (F.OPENED_WITHIN, F.CLICKED_WITHIN):
        kind = Event.Type.OPENED if field == F.OPENED_WITHIN else Event.Type.CLICKED
        return Q(_engaged(kind, now - timedelta(days=int(values[0]))))
    if field == F.NEVER_OPENED:
        opened = Q(_engaged(Event.Type.OPENED, None))
        return ~opened if op == Op.TRUE else opened
    raise SegmentError(f"Unknown field {field!r}.", field="field")


def contacts(
    segment: Segment,
    *,
    now: datetime | None = None,
    within: tuple[int, int] | None = None,
    _seen: frozenset = frozenset(),
) -> QuerySet:
    """Every contact the segment selects, as one queryset (subqueries, no Python loop).

    ``within`` (low, high] limits every level, nested segments too, to a range of contact
    ids: a materialization chunk then reads that range of each index, not every contact.
    """
    if segment.pk in _seen:
        raise SegmentError(f"Segment {segment.name!r} includes itself.")
    seen = _seen | {segment.pk}
    queryset = _base(within)
    rules = [rule_q(rule, now) for rule in segment.rules.all()]
    if rules:
        queryset = queryset.filter(
            reduce(and_ if segment.match == Segment.Match.ALL else or_, rules)
        )
    for included in segment.include_segments.all():
        nested = contacts(included, now=now, within=within, _seen=seen)
        queryset = queryset.filter(pk__in=nested.values("pk"))
    for excluded in segment.exclude_segments.all():
        nested = contacts(excluded, now=now, within=within, _seen=seen)
        queryset = queryset.exclude(pk__in=nested.values("pk"))
    return queryset


def _base(within: tuple[int, int] | None) -> QuerySet:
    queryset = Contact.objects.order_by()
    if within is not None:
        queryset = queryset.filter(pk__gt=within[0], pk__lte=within[1])
    return queryset


def count(segment: Segment) -> int:
    return contacts(segment).count()


def check_no_cycle(
    segment: Segment, *, include: Iterable[Segment] = (), exclude: Iterable[Segment] = ()
) -> None:
    """Refuse includes and excludes that lead back to ``segment``, directly or through
    other segments: its query would be built from itself, so it could never be evaluated.

    ``include`` and ``exclude`` are the segment's new references (not yet saved); the
    rest of the graph is read level by level, two small queries per level.
    """
    start = {s.pk: s.name for s in (*include, *exclude)}
    if segment.pk is None:
        return  # a new segment: nothing refers to it yet
    names = {segment.pk: segment.name, **start}
    parent: dict[int, int] = {pk: segment.pk for pk in start}
    frontier = set(start)
    while frontier:
        if segment.pk in frontier:
            path, pk = [segment.pk], parent[segment.pk]
            while pk != segment.pk:
                path.append(pk)
                pk = parent[pk]
            path.append(segment.pk)
            chain = " → ".join(names.get(pk, f"#{pk}") for pk in reversed(path))
            raise SegmentError(
                f"A segment cannot include or exclude itself, directly or through others: {chain}.",
                field="include_segments",
            )
        edges = []
        for through in (Segment.include_segments.through, Segment.exclude_segments.through):
            edges += through.objects.filter(from_segment_id__in=frontier).values_list(
                "from_segment_id", "to_segment_id", "to_segment__name"
            )
        frontier = set()
        for source, target, name in edges:
            names[target] = name
            if target not in parent:
                parent[target] = source
                frontier.add(target)


def audience(
    campaign: Campaign, *, now: datetime | None = None, within: tuple[int, int] | None = None
) -> QuerySet:
    """Who a campaign may mail: in its segments, not excluded, consented, not suppressed.

    ``within`` limits it to a range of contact ids, as in ``contacts``.
    """
    included = [contacts(s, now=now, within=within).values("pk") for s in campaign.segments.all()]
    if not included:
        return Contact.objects.none()
    queryset = _base(within).filter(reduce(or_, (Q(pk__in=ids) for ids in included)))
    for excluded in campaign.exclude_segments.all():
        queryset = queryset.exclude(pk__in=contacts(excluded, now=now, within=within).values("pk"))
    return queryset.filter(consent=Contact.Consent.GRANTED).exclude(
        Exists(Suppression.objects.filter(email=OuterRef("email")))
    )
