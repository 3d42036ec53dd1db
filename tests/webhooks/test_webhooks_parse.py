"""Tests for the pure webhook-body parser, on real captured bodies and on built ones."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from urllib.parse import urlencode

import pytest

from amohook.webhooks.parse import (
    MAX_FIELDS,
    MAX_FORM_DEPTH,
    BodyRejected,
    ParsedWebhook,
    UnsupportedMediaType,
    WebhookEvent,
    extract_events,
    parse_body,
    parse_form,
    parse_json,
    parse_webhook,
    to_lists,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "webhooks"
FORM = "application/x-www-form-urlencoded"


def read_fixture(name: str) -> tuple[str, bytes]:
    """Return (header comment text, body): '#' lines, a blank line, then the body."""
    header, sep, body = (FIXTURES / name).read_bytes().partition(b"\n\n")
    assert sep, f"{name}: no blank line between header and body"
    assert all(line.startswith(b"#") for line in header.splitlines()), name
    return header.decode("utf-8"), body.rstrip(b"\n")


def fixture_body(name: str) -> bytes:
    return read_fixture(name)[1]


def flatten(tree: object, prefix: str, *, append: bool = False) -> list[tuple[str, str]]:
    """Encode a nested tree as PHP bracket (key, value) pairs, as http_build_query would.

    With ``append``, lists of scalars use ``[]`` (as PHP would read them); other lists keep
    explicit indexes, since every ``[]`` field starts a new element.
    """
    if isinstance(tree, dict):
        pairs = []
        for key, value in tree.items():
            pairs += flatten(value, f"{prefix}[{key}]" if prefix else key, append=append)
        return pairs
    if isinstance(tree, list):
        pairs = []
        for i, value in enumerate(tree):
            scalar = not isinstance(value, (dict, list))
            key = f"{prefix}[]" if append and scalar else f"{prefix}[{i}]"
            pairs += flatten(value, key, append=append)
        return pairs
    return [(prefix, tree)]


def form(tree: dict, **kw) -> bytes:
    return urlencode(flatten(tree, "", **kw)).encode("ascii")


def summary(parsed: ParsedWebhook) -> list[tuple]:
    return [(e.entity, e.action, e.entity_id, e.index, e.block) for e in parsed.events]


# --- real bodies -------------------------------------------------------------------------------

# Hand-checked against each file: (entity, action, entity_id, index, block), subdomain, account id.
EXPECTED = {
    "01_lead_status_2016.txt": ([("leads", "status", "31926520", 0, "leads")], "test000002", None),
    "04_lead_add_2016.txt": ([("leads", "add", "31926529", 0, "leads")], "test000002", None),
    "05_lead_add_2025.txt": ([("leads", "add", "30052055", 0, "leads")], "unirock", "16700680"),
    "06_lead_update_custom_field_2025.txt": (
        [("leads", "update", "30052055", 0, "leads")],
        "unirock",
        "16700680",
    ),
    "07_lead_delete_2025.txt": (
        [("leads", "delete", "30052055", 0, "leads")],
        "unirock",
        "16700680",
    ),
    "12_lead_responsible_2016.txt": (
        [("leads", "responsible", "31926520", 0, "leads")],
        "test000002",
        None,
    ),
    "13_contact_add_2016.txt": ([("contacts", "add", "1112", 0, "contacts")], "test000002", None),
    "18_company_add_2016.txt": ([("companies", "add", "1110", 0, "contacts")], "test000002", None),
    "19_note_lead_2020.txt": (
        [("leads", "note", "213313359", 0, "leads")],
        "makeprofit",
        "15109720",
    ),
    "20_task_update_docs.txt": ([("tasks", "update", "11122233", 0, "task")], "test", None),
}


def test_every_fixture_is_covered():
    assert sorted(p.name for p in FIXTURES.glob("*.txt")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_events(name):
    events, subdomain, account_id = EXPECTED[name]
    parsed = parse_webhook(fixture_body(name), FORM)
    assert summary(parsed) == events
    assert parsed.account_subdomain == subdomain
    assert parsed.account_id == account_id
    assert all(isinstance(e, WebhookEvent) for e in parsed.events)


def _captured_length(name: str) -> int | None:
    match = re.search(r"Content-Length header \((\d+)\)", read_fixture(name)[0])
    return int(match.group(1)) if match else None


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if _captured_length(n) is not None])
def test_fixture_length_matches_captured_content_length(name):
    # Proves the header/body split reads the body exactly as captured.
    assert len(fixture_body(name)) == _captured_length(name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_reencodes_byte_for_byte(name):
    # docs/amocrm.md §5: urlencode reproduces real bodies exactly, so parsing lost nothing.
    body = fixture_body(name)
    assert form(parse_form(body)) == body


def test_fixture_01_fields():
    parsed = parse_webhook(fixture_body("01_lead_status_2016.txt"), FORM)
    data = parsed.events[0].data
    assert data["old_status_id"] == "10216995"
    assert data["status_id"] == "10216994"
    assert data["custom_fields"][0]["values"][0]["value"] == "some text"
    assert data["custom_fields"][0]["id"] == "1119321"
    assert data["account_id"] == "10216991"  # not used: the account block exists (subdomain only)
    assert parsed.payload["account"] == {"subdomain": "test000002"}


def test_fixture_05_account_links_and_first_position():
    parsed = parse_webhook(fixture_body("05_lead_add_2025.txt"), FORM)
    assert list(parsed.payload)[0] == "account"
    assert parsed.payload["account"]["_links"]["self"] == "https://unirock.amocrm.ru"
    assert parsed.events[0].data["name"] == "TEST MISHA (SORRY)"


def test_fixture_06_custom_field_and_robot_user():
    data = parse_webhook(fixture_body("06_lead_update_custom_field_2025.txt"), FORM).events[0].data
    assert data["modified_user_id"] == "0"
    assert data["custom_fields"] == [{"id": "957901", "name": "test_id", "values": [{"value": "30052055"}]}]


def test_fixture_07_delete_carries_only_three_fields():
    data = parse_webhook(fixture_body("07_lead_delete_2025.txt"), FORM).events[0].data
    assert data == {"id": "30052055", "status_id": "17944873", "pipeline_id": "936736"}


def test_fixture_12_old_responsible():
    data = parse_webhook(fixture_body("12_lead_responsible_2016.txt"), FORM).events[0].data
    assert data["old_responsible_user_id"] == "102525"
    assert data["responsible_user_id"] == "938348"


def test_fixture_13_and_18_contact_vs_company():
    contact = parse_webhook(fixture_body("13_contact_add_2016.txt"), FORM).events[0]
    company = parse_webhook(fixture_body("18_company_add_2016.txt"), FORM).events[0]
    assert (contact.entity, contact.data["type"]) == ("contacts", "contact")
    assert (company.entity, company.block) == ("companies", "contacts")
    assert company.data["type"] == "company"


def test_fixture_19_note_text_survives_decoding():
    event = parse_webhook(fixture_body("19_note_lead_2020.txt"), FORM).events[0]
    note = event.data["note"]
    assert "id" not in event.data
    assert note["element_id"] == "22060555"
    assert note["note_type"] == "4"
    assert note["date_create"] == "2020-09-28 00:26:51"
    assert note["text"].startswith("Количество этажей будет в вашем будущем доме?\nДва\n\n")
    assert "площадь будущего дома в м²" in note["text"]
    assert "utm_source=ig&amp;utm_medium=domagency" in note["text"]


def test_fixture_20_task_result():
    event = parse_webhook(fixture_body("20_task_update_docs.txt"), FORM).events[0]
    assert event.data["result"] == {"id": "155155155", "text": "Success"}
    assert event.data["complete_till"] == "2017-07-22 23:59:00"
    assert event.data["action_close"] == "1"


# --- built bodies ------------------------------------------------------------------------------

ACCOUNT = {"subdomain": "acme", "id": "42", "_links": {"self": "https://acme.amocrm.ru"}}


def test_several_items_in_one_block():
    body = form(
        {
            "leads": {"status": [{"id": "1", "status_id": "10"}, {"id": "2", "status_id": "20"}]},
            "account": ACCOUNT,
        }
    )
    parsed = parse_webhook(body, FORM)
    assert summary(parsed) == [
        ("leads", "status", "1", 0, "leads"),
        ("leads", "status", "2", 1, "leads"),
    ]
    assert [e.data["status_id"] for e in parsed.events] == ["10", "20"]
    assert (parsed.account_subdomain, parsed.account_id) == ("acme", "42")


def test_several_actions_in_one_body():
    # A stage move can arrive as both update and status in one POST (docs/amocrm.md §5).
    body = form(
        {
            "leads": {
                "update": [{"id": "7", "old_status_id": "1"}],
                "status": [{"id": "7", "old_status_id": "1"}],
            },
            "task": {"add": [{"id": "9"}]},
            "account": ACCOUNT,
        }
    )
    assert summary(parse_webhook(body, FORM)) == [
        ("leads", "update", "7", 0, "leads"),
        ("leads", "status", "7", 0, "leads"),
        ("tasks", "add", "9", 0, "task"),
    ]


def test_account_first_or_last_gives_the_same_events():
    leads = {"status": [{"id": "5", "status_id": "142", "pipeline_id": "3"}]}
    first = parse_webhook(form({"account": ACCOUNT, "leads": leads}), FORM)
    last = parse_webhook(form({"leads": leads, "account": ACCOUNT}), FORM)
    assert first.events == last.events
    assert (first.account_subdomain, first.account_id) == (last.account_subdomain, last.account_id)
    assert first.account_id == "42"


def test_unknown_block_becomes_an_event():
    body = b"widgets%5Binstall%5D%5B0%5D%5Bid%5D=5&account%5Bsubdomain%5D=acme"
    parsed = parse_webhook(body, FORM)
    assert summary(parsed) == [("widgets", "install", "5", 0, "widgets")]
    assert parsed.events[0].data == {"id": "5"}


def test_unbracketed_encoding_is_read_too():
    parsed = parse_webhook(b"leads[add][0][id]=3&leads[add][0][name]=a+b", FORM)
    assert summary(parsed) == [("leads", "add", "3", 0, "leads")]
    assert parsed.events[0].data["name"] == "a b"


def test_delete_as_scalar():
    # {entity:{action:id}} for deletions (docs/amocrm.md §5, quoting DOCS webhooks-format).
    body = urlencode({"leads[delete]": "123", "account[subdomain]": "acme"}).encode()
    parsed = parse_webhook(body, FORM)
    assert summary(parsed) == [("leads", "delete", "123", 0, "leads")]
    assert parsed.events[0].data == {"id": "123"}


@pytest.mark.parametrize("append", [False, True])
def test_delete_as_list_of_scalars(append):
    body = form({"leads": {"delete": ["123", "124"]}, "account": ACCOUNT}, append=append)
    parsed = parse_webhook(body, FORM)
    assert summary(parsed) == [
        ("leads", "delete", "123", 0, "leads"),
        ("leads", "delete", "124", 1, "leads"),
    ]
    assert [e.data for e in parsed.events] == [{"id": "123"}, {"id": "124"}]


def test_date_custom_field_without_value_key():
    # Date fields come as custom_fields[k][values][0]=<ts>, no [value] (docs/amocrm.md §5, §7.3).
    pairs = [
        ("leads[update][0][id]", "8"),
        ("leads[update][0][custom_fields][0][id]", "555"),
        ("leads[update][0][custom_fields][0][values][0]", "1700000000"),
        ("leads[update][0][custom_fields][1][id]", "556"),
        ("leads[update][0][custom_fields][1][values][0][value]", "text"),
        ("leads[update][0][custom_fields][1][values][0][enum]", "77"),
        ("leads[update][0][custom_fields][2][id]", "557"),  # a field with no values at all
    ]
    data = parse_webhook(urlencode(pairs).encode(), FORM).events[0].data
    assert data["custom_fields"] == [
        {"id": "555", "values": ["1700000000"]},
        {"id": "556", "values": [{"value": "text", "enum": "77"}]},
        {"id": "557"},
    ]


def test_id_fallbacks_for_unsorted_and_talks():
    body = form(
        {
            "unsorted": {"add": [{"uid": "abc-1", "category": "forms"}]},
            "talk": {"update": [{"talk_id": "17", "chat_id": "c"}]},
            "message": {"add": [{"id": "m1", "talk_id": "17"}]},
            "customers": {"add": [{"name": "no id"}]},
        }
    )
    assert summary(parse_webhook(body, FORM)) == [
        ("unsorted", "add", "abc-1", 0, "unsorted"),
        ("talks", "update", "17", 0, "talk"),
        ("messages", "add", "m1", 0, "message"),
        ("customers", "add", None, 0, "customers"),
    ]


def test_account_id_falls_back_to_first_item_without_account_block():
    items = [{"id": "1", "account_id": "999"}, {"id": "2", "account_id": "998"}]
    body = form({"leads": {"status": items}})
    parsed = parse_webhook(body, FORM)
    assert (parsed.account_subdomain, parsed.account_id) == (None, "999")


def test_account_id_falls_back_to_note_account_id():
    body = form({"leads": {"note": [{"note": {"id": "3", "account_id": "77"}}]}})
    parsed = parse_webhook(body, FORM)
    assert parsed.account_id == "77"


def test_no_items_is_not_an_error():
    parsed = parse_webhook(form({"account": ACCOUNT, "ping": "1"}), FORM)
    assert parsed.events == []
    assert parsed.account_subdomain == "acme"
    assert parsed.payload["ping"] == "1"
    assert parse_webhook(b"", FORM).events == []


def test_blank_values_and_fields_without_equals_are_kept():
    assert parse_form(b"a=&b&c=1&&") == {"a": "", "b": "", "c": "1"}


def test_append_and_repeated_keys():
    appended = {"a": {"0": "x", "1": "y", "5": "z", "6": "w"}}
    assert parse_form(b"a[]=x&a[]=y&a[5]=z&a[]=w") == appended
    assert parse_form(b"a[][b]=1&a[][b]=2") == {"a": {"0": {"b": "1"}, "1": {"b": "2"}}}
    assert parse_form(b"a=1&a=2") == {"a": "2"}  # last wins, as in PHP


def test_to_lists():
    tree = {
        "a": {"0": "x", "1": {"1": "q", "0": "p"}},
        "b": {"0": "x", "2": "y"},
        "c": {},
        "d": {"01": "z"},
    }
    assert to_lists(tree) == {
        "a": ["x", ["p", "q"]],
        "b": {"0": "x", "2": "y"},
        "c": {},
        "d": {"01": "z"},
    }
    assert to_lists({"0": "a"}) == ["a"]
    assert tree["a"]["1"] == {"1": "q", "0": "p"}  # the input is not modified


def test_extract_events_accepts_an_unconverted_tree():
    tree = parse_form(fixture_body("01_lead_status_2016.txt"))
    parsed = extract_events(tree)
    assert summary(parsed) == EXPECTED["01_lead_status_2016.txt"][0]
    assert parsed.payload == to_lists(tree)


# --- JSON --------------------------------------------------------------------------------------


def test_json_body_goes_through_the_same_extraction():
    payload = {
        "leads": {"status": [{"id": 31926520, "status_id": 142, "old_status_id": 10216995}]},
        "contacts": {"add": [{"id": 1110, "type": "company"}], "delete": 55},
        "account": {"subdomain": "acme", "id": 42},
    }
    parsed = parse_webhook(json.dumps(payload).encode(), "Application/JSON")
    assert summary(parsed) == [
        ("leads", "status", "31926520", 0, "leads"),
        ("companies", "add", "1110", 0, "contacts"),
        ("contacts", "delete", "55", 0, "contacts"),
    ]
    assert (parsed.account_subdomain, parsed.account_id) == ("acme", "42")
    assert parsed.events[0].data["old_status_id"] == 10216995  # JSON keeps its types in data


def test_json_single_item_without_index():
    parsed = parse_webhook(b'{"leads": {"update": {"id": "4"}}}', "application/vnd.example+json")
    assert summary(parsed) == [("leads", "update", "4", 0, "leads")]


# --- rejections --------------------------------------------------------------------------------


def rejected(call, *args, **kw) -> BodyRejected:
    with pytest.raises(BodyRejected) as info:
        call(*args, **kw)
    assert info.value.status == 400
    assert info.value.reason in str(info.value)
    return info.value


# PHP takes any bytes, and a refused delivery counts toward amoCRM switching the webhook off: what
# is not UTF-8 becomes U+FFFD (Python's "replace": one per maximal invalid subpart).
def test_invalid_utf8_raw_is_replaced():
    assert parse_form(b"a=\xff\xfe") == {"a": "\ufffd\ufffd"}
    parsed = parse_webhook(b"leads[add][0][name]=\xc3(&leads[add][0][id]=1", FORM)
    assert parsed.events[0].data == {"name": "\ufffd(", "id": "1"}


@pytest.mark.parametrize(
    "body, tree",
    [
        (b"a=%FF", {"a": "\ufffd"}),
        (b"%FF=a", {"\ufffd": "a"}),
        (b"a=%C3%28", {"a": "\ufffd("}),
        (b"a=%ED%A0%80", {"a": "\ufffd\ufffd\ufffd"}),
        (b"a=%D0%9F%D0", {"a": "\u041f\ufffd"}),  # a text cut inside its last character
        (b"a=%D0%9F%D0&b=%", {"a": "\u041f\ufffd", "b": "%"}),  # the same, field by field
        (b"a=%D0\x9f&b=\x00", {"a": "\u041f", "b": "\x00"}),  # escapes and raw bytes make one character
    ],
)
def test_invalid_utf8_percent_encoded_is_replaced(body, tree):
    assert parse_form(body) == tree


def test_valid_utf8_percent_encoded():
    assert parse_form(b"a=%D0%94%D0%B0") == {"a": "Да"}


def test_too_many_fields():
    body = b"&".join(b"f%d=1" % i for i in range(20_000))
    assert f"more than {MAX_FIELDS} fields" in rejected(parse_form, body).reason


def test_field_limit_counts_fields_not_ampersands():
    five = b"&".join(b"f%d=1" % i for i in range(5))
    assert len(parse_form(b"&&&" + five + b"&&", max_fields=5)) == 5
    six = five + b"&f5=1"
    assert "more than 5 fields" in rejected(parse_form, six, max_fields=5).reason


# --- PHP's reading of form bodies ------------------------------------------------------------
# amoCRM's bodies are PHP's form encoding, so they are read exactly as PHP 8 reads $_POST; no body
# PHP accepts is refused for its shape. Each expected tree is what PHP 8.2's parse_str() (the
# same php_register_variable_ex as $_POST) gave for the body, written out here (order matters:
# PHP keeps a replaced name in its place).
PHP_CASES = [
    # a container replaced by a value
    ("a[b]=2&a=1", {"a": "1"}),
    # a value replaced by a container
    ("a=2&a[b]=1", {"a": {"b": "1"}}),
    # a nested container replaced by a value
    ("a[b][c]=1&a[b]=2", {"a": {"b": "2"}}),
    # an appended value replaced by a container
    ("a[]=1&a[0][b]=2", {"a": {"0": {"b": "2"}}}),
    # a replaced name keeps its place
    ("x=1&a[b]=1&x[y]=2", {"x": {"y": "2"}, "a": {"b": "1"}}),
    # a nested value replaced in its place
    ("a[b]=1&a[b][c]=2&a[d]=3", {"a": {"b": {"c": "2"}, "d": "3"}}),
    # a new container after a value starts appending at 0
    ("a[b][]=1&a[b]=2&a[b][]=3", {"a": {"b": {"0": "3"}}}),
    # text after ']' is ignored
    ("a[b]c=1", {"a": {"b": "1"}}),
    # everything after the first text after ']' is ignored
    ("a[b]c[d]=1", {"a": {"b": "1"}}),
    # a second ']' is text after ']'
    ("a[b]]=1", {"a": {"b": "1"}}),
    # text after '[]' is ignored
    ("a[]x=1", {"a": {"0": "1"}}),
    # a first '[' without ']' is '_' in a plain name
    ("a[b=1", {"a_b": "1"}),
    # and the rest is mangled like a base name
    ("a[b.c d=1", {"a_b_c_d": "1"}),
    # a later '[' without ']' ends the name
    ("a[b][c=1", {"a": {"b": "1"}}),
    # a later '[' without ']' after '[]' appends
    ("a[][=1", {"a": {"0": "1"}}),
    # a ']' without '[' is part of the name
    ("a]=1", {"a]": "1"}),
    # an index runs to the first ']' and may hold '['
    ("a[b[c]=1", {"a": {"b[c": "1"}}),
    # an index may start with '['
    ("a[[b]]=1", {"a": {"[b": "1"}}),
    # spaces and dots in the base name become '_', not in an index
    ("a.b c[x.y]=1", {"a_b_c": {"x.y": "1"}}),
    # leading spaces are dropped
    ("+ +a=1", {"a": "1"}),
    # an empty base name drops the variable
    ("[a]=1&=2&+=3&b=4", {"b": "4"}),
    # a name ends at NUL; a value keeps it
    ("a%00b[c]=1&d=x%00y", {"a": "1", "d": "x\x00y"}),
    # a NUL inside an index ends the name there
    ("a[b%00c]=1", {"a_b": "1"}),
    # mangling must not make __Host- or __Secure- names
    ("..Host-a=1&a[__Secure-x]=2&__Host-b[__Host-c]=3", {"a": {}, "__Host-b": {"__Host-c": "3"}}),
    # [] appends after the largest integer key
    ("a[]=1&a[]=2&a[5]=x&a[]=3", {"a": {"0": "1", "1": "2", "5": "x", "6": "3"}}),
    # one whitespace character in brackets appends too
    ("a[ ]=1&a[%09]=2&a[  ]=3&a[ x]=4", {"a": {"0": "1", "1": "2", "  ": "3", " x": "4"}}),
    # only canonical integers count as integer keys
    ("a[x]=1&a[]=2&a[01]=3&a[-0]=4&a[]=5", {"a": {"x": "1", "0": "2", "01": "3", "-0": "4", "1": "5"}}),
    # after a negative key, [] appends at the next integer
    ("a[-5]=1&a[]=2", {"a": {"-5": "1", "-4": "2"}}),
    # the key after PHP_INT_MAX - 1 is PHP_INT_MAX, then [] is dropped
    ("a[9223372036854775806]=1&a[]=2&a[]=3", {"a": {"9223372036854775806": "1", "9223372036854775807": "2"}}),
    # [] after PHP_INT_MAX drops the variable
    ("a[9223372036854775807]=1&a[][b]=2&a[x]=3", {"a": {"9223372036854775807": "1", "x": "3"}}),
    # keys beyond PHP_INT_MAX are strings
    ("a[9223372036854775808]=1&a[]=2", {"a": {"9223372036854775808": "1", "0": "2"}}),
    # PHP_INT_MIN is an integer key
    ("a[-9223372036854775808]=1&a[]=2", {"a": {"-9223372036854775808": "1", "-9223372036854775807": "2"}}),
    # each [] is a new element
    ("a[][b]=1&a[][b]=2", {"a": {"0": {"b": "1"}, "1": {"b": "2"}}}),
]


def same_tree(ours: dict, php: dict) -> bool:
    """Equal, keys in the same order, at every level."""
    return json.dumps(ours, ensure_ascii=False) == json.dumps(php, ensure_ascii=False)


@pytest.mark.parametrize("body, php", PHP_CASES, ids=[body for body, _ in PHP_CASES])
def test_form_bodies_are_read_as_php_reads_them(body, php):
    assert same_tree(parse_form(body.encode()), php)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_real_capture_parses_as_php_parsed_it(name):
    php = json.loads((FIXTURES / "php_parse_str" / name.replace(".txt", ".json")).read_text(encoding="utf-8"))
    assert same_tree(parse_form(fixture_body(name)), php)


def nest(depth: int, leaf: object) -> object:
    for _ in range(depth):
        leaf = {"x": leaf}
    return leaf


def test_php_nesting_limit_is_exact():
    assert MAX_FORM_DEPTH == 64
    deep = lambda n: "a" + "[x]" * n  # noqa: E731
    assert same_tree(parse_form(f"{deep(64)}=1".encode()), {"a": nest(64, "1")})
    # A 65th group drops the variable, and everything stored under its base name before.
    assert same_tree(parse_form(f"a[y]=0&{deep(65)}=1&b=2".encode()), {"b": "2"})
    assert same_tree(parse_form(f"a[y]=0&{deep(64)}[z=1&a[w]=2".encode()), {"a": {"w": "2"}})
    assert same_tree(parse_form(f"{deep(64)}junk[x]=1".encode()), {"a": nest(64, "1")})


def test_a_thousand_deep_key_is_dropped_cheaply():
    body = b"a" + b"%5Bx%5D" * 100_000 + b"=1&b=2"
    assert parse_form(body) == {"b": "2"}


def test_the_shape_of_a_body_is_never_a_reason_to_refuse_it():
    """Bracket soup, conflicts and odd names: PHP accepts them all, and so does amohook."""
    rng = random.Random(7)
    atoms = ["a", "b", "[", "]", "[]", " ", ".", "0", "-1", "01", "%5B", "%00", "%09", "[ ]", "__Host-", "[x]"]
    for _ in range(2000):
        body = "&".join(
            "".join(rng.choice(atoms) for _ in range(rng.randint(1, 8))) + "=1" for _ in range(rng.randint(1, 8))
        )
        assert isinstance(parse_form(body.encode()), dict)


@pytest.mark.parametrize("body", [b"{", b"{'a': 1}", b'{"a": NaN}', b'{"a": 1} x', b""])
def test_invalid_json(body):
    assert "invalid JSON" in rejected(parse_json, body).reason


@pytest.mark.parametrize(
    "body, kind",
    [(b"[1, 2]", "an array"), (b'"s"', "a string"), (b"3", "a number"), (b"null", "null")],
)
def test_json_top_level_must_be_an_object(body, kind):
    reason = rejected(parse_json, body).reason
    assert "top level must be an object" in reason and kind in reason


def test_json_invalid_utf8_is_replaced():
    assert parse_json(b'{"a": "\xff"}') == {"a": "\ufffd"}


def test_json_depth():
    at_limit = '{"a": ' * 33 + "1" + "}" * 33  # top-level object + 32 nested
    assert parse_json(at_limit.encode())
    too_deep = '{"a": ' * 34 + "1" + "}" * 34
    assert "nesting deeper than 32" in rejected(parse_json, too_deep.encode()).reason
    lists = b'{"a": ' + b"[" * 33 + b"]" * 33 + b"}"
    assert "nesting deeper than 32" in rejected(parse_json, lists).reason
    huge = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nesting deeper than 32" in rejected(parse_json, huge).reason


def test_text_plain_is_unsupported():
    with pytest.raises(UnsupportedMediaType) as info:
        parse_body(b"a=1", "text/plain")
    assert info.value.status == 415
    assert isinstance(info.value, BodyRejected)
    assert "text/plain" in info.value.reason


@pytest.mark.parametrize(
    "content_type",
    [
        FORM,
        "application/x-www-form-urlencoded; charset=UTF-8",
        "APPLICATION/X-WWW-FORM-URLENCODED",
        None,
        "",
    ],
)
def test_form_content_types(content_type):
    expected = {"leads": {"add": {"0": {"id": "1"}}}}
    assert parse_body(b"leads[add][0][id]=1", content_type) == expected


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        "application/problem+json",
    ],
)
def test_json_content_types(content_type):
    assert parse_body(b'{"a": 1}', content_type) == {"a": 1}


def test_form_sent_as_json_is_rejected_not_a_traceback():
    # docs/amocrm.md §7.1: the classic mistake, seen the other way round.
    body = fixture_body("05_lead_add_2025.txt")
    assert "invalid JSON" in rejected(parse_body, body, "application/json").reason


# --- property-style round trip -----------------------------------------------------------------

_KEY_CHARS = "abcxyz_-. %&=+#?/Дж"
_VALUE_CHARS = _KEY_CHARS + "[]0123456789\n'\"€😀"


def _random_key(rng: random.Random, top: bool = False) -> str:
    """A key PHP reads back as written: not all digits (those become list indexes), not blank (an
    index of one blank appends), and at the top level without the spaces and dots PHP turns into
    '_'."""
    while True:
        key = "".join(rng.choice(_KEY_CHARS) for _ in range(rng.randint(1, 6)))
        if not key.isdigit() and key.strip() and not (top and (" " in key or "." in key)):
            return key


def _random_tree(rng: random.Random, depth: int) -> object:
    roll = rng.random()
    if depth == 0 or roll < 0.35:
        return "".join(rng.choice(_VALUE_CHARS) for _ in range(rng.randint(0, 8)))
    if roll < 0.6:
        return [_random_tree(rng, depth - 1) for _ in range(rng.randint(1, 4))]
    return {_random_key(rng): _random_tree(rng, depth - 1) for _ in range(rng.randint(1, 4))}


@pytest.mark.parametrize("seed", range(25))
def test_round_trip_random_trees(seed):
    rng = random.Random(seed)
    tree = {_random_key(rng, top=True): _random_tree(rng, rng.randint(1, 6)) for _ in range(rng.randint(1, 5))}
    body = form(tree, append=rng.random() < 0.5)
    assert to_lists(parse_form(body)) == tree
