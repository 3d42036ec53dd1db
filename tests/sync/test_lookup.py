"""Names and ids resolve against the store alike on every backend; a miss says what was meant."""

from __future__ import annotations

import pytest

from amohook.errors import AmohookError, ExitCode
from amohook.lookup import (
    Ambiguous,
    NotFound,
    find_custom_field,
    find_pipeline,
    find_stage,
    find_task_type,
    find_user,
    suggest,
)
from amohook.store.models import Account, CustomField, Pipeline, Stage, TaskType, User
from amohook.sync import sync_entities


@pytest.fixture
def rows(store):
    """Two pipelines with the system statuses in each, task types, users; and another account."""
    with store.write():
        for pid, name, stages in ((10, "Sales", ["Qualified", "Proposal"]), (20, "Продажи опт", ["Квалифицирован"])):
            Pipeline.create(account="example", amo_id=pid, name=name, sort=pid)
            Stage.create(account="example", pipeline_id=pid, amo_id=pid * 100, name="Неразобранное", sort=10, type=1)
            for i, stage in enumerate(stages, 1):
                Stage.create(account="example", pipeline_id=pid, amo_id=pid * 100 + i, name=stage, sort=10 + 10 * i)
            Stage.create(account="example", pipeline_id=pid, amo_id=142, name="Успешно реализовано", sort=10000)
            Stage.create(account="example", pipeline_id=pid, amo_id=143, name="Закрыто и не реализовано", sort=11000)
        TaskType.create(account="example", amo_id=1, name="Связаться", code="FOLLOW_UP")
        TaskType.create(account="example", amo_id=2, name="Встреча", code="MEETING")
        TaskType.create(account="example", amo_id=2136271, name="Call")
        User.create(account="example", amo_id=581651, name="Анна Петрова", email="anna@example.com", is_admin=True)
        User.create(account="example", amo_id=123123, name="Иван Смирнов", email="ivan@example.com")
        User.create(account="example", amo_id=777, name="Пётр Ёлкин", email="petr@example.com", is_active=False)
        Pipeline.create(account="other", amo_id=30, name="Theirs")
        CustomField.create(account="example", amo_id=501, name="Source", type="select")
        CustomField.create(account="example", amo_id=502, name="Budget", type="numeric", code="BUDGET")


# -- pipelines and stages ----------------------------------------------------------------------
def test_pipeline_by_name_id_and_digit_string(rows):
    assert find_pipeline("example", "Sales").amo_id == 10
    assert find_pipeline("example", 20).name == "Продажи опт"
    assert find_pipeline("example", "20").name == "Продажи опт"


def test_names_ignore_case_spaces_and_yo(rows):
    assert find_pipeline("example", "  sales ").amo_id == 10
    assert find_pipeline("example", "ПРОДАЖИ   ОПТ").amo_id == 20
    assert find_user("example", "петр елкин").amo_id == 777


def test_a_misspelt_stage_suggests_the_close_one_in_that_pipeline(rows):
    with pytest.raises(NotFound) as err:
        find_stage("example", "Sales", "Qualifed")
    e = err.value
    assert str(e) == "no stage 'Qualifed' in pipeline 'Sales' — did you mean 'Qualified'?"
    assert (e.kind, e.given, e.suggestions) == ("stage", "Qualifed", ["Qualified"])
    assert isinstance(e, AmohookError) and e.exit_code == ExitCode.USAGE


def test_a_stage_of_another_pipeline_is_not_found_there(rows):
    with pytest.raises(NotFound, match="in pipeline 'Продажи опт'"):
        find_stage("example", "Продажи опт", "Qualified")


def test_system_stages_are_keyed_by_pipeline(rows):
    assert find_stage("example", "Sales", 142).pipeline_id == 10
    assert find_stage("example", 20, "142").pipeline_id == 20
    assert find_stage("example", find_pipeline("example", 20), "Успешно реализовано").pipeline_id == 20


def test_won_and_lost_name_the_system_stages_whatever_they_are_called(rows):
    assert find_stage("example", "Sales", "won").amo_id == 142
    assert find_stage("example", "Sales", "Lost").amo_id == 143


def test_a_stage_of_an_unknown_pipeline_names_the_pipeline(rows):
    with pytest.raises(NotFound, match="no pipeline 'Sale' in account 'example' — did you mean 'Sales'"):
        find_stage("example", "Sale", "Qualified")


def test_an_unknown_id_is_not_found_without_guesses(rows):
    with pytest.raises(NotFound) as err:
        find_pipeline("example", 99)
    assert err.value.suggestions == [] and "amohook pipelines" in str(err.value)


def test_nothing_close_points_at_the_listing(rows):
    with pytest.raises(NotFound) as err:
        find_stage("example", "Sales", "Zzzz")
    assert str(err.value) == (
        "no stage 'Zzzz' in pipeline 'Sales' — "
        "`amohook pipelines --subdomain example` lists the stages of every pipeline"
    )


def test_accounts_are_separate(rows):
    with pytest.raises(NotFound):
        find_pipeline("example", "Theirs")
    assert find_pipeline("other", "Theirs").amo_id == 30
    assert find_pipeline(Account(subdomain="other"), 30).name == "Theirs"


def test_an_empty_store_says_to_sync_first(store):
    with pytest.raises(NotFound) as err:
        find_pipeline("example", "Sales")
    assert str(err.value) == (
        "no pipeline 'Sales' in account 'example' — no pipelines are stored yet: "
        "run `amohook sync-entities --subdomain example`"
    )


def test_two_rows_with_one_name_are_ambiguous_not_guessed(rows, store):
    with store.write():
        Pipeline.create(account="example", amo_id=40, name="sales")
    assert find_pipeline("example", "Sales").amo_id == 10  # the exact spelling still decides
    with store.write():
        Pipeline.create(account="example", amo_id=50, name="Sales")
    with pytest.raises(Ambiguous) as err:
        find_pipeline("example", "Sales")
    assert "Sales (id 10), Sales (id 50)" in str(err.value) and "use the id" in str(err.value)


def test_a_name_made_of_digits_is_found_when_no_id_matches(rows, store):
    with store.write():
        Pipeline.create(account="example", amo_id=60, name="2025")
    assert find_pipeline("example", "2025").amo_id == 60
    assert find_pipeline("example", "10").name == "Sales"  # an id wins over a name


# -- task types and users ----------------------------------------------------------------------
def test_task_type_by_name_code_or_id(rows):
    assert find_task_type("example", "Встреча").amo_id == 2
    assert find_task_type("example", "meeting").amo_id == 2
    assert find_task_type("example", 1).code == "FOLLOW_UP"
    assert find_task_type("example", "call").amo_id == 2136271


def test_task_type_miss_suggests(rows):
    with pytest.raises(NotFound, match="did you mean 'Встреча'"):
        find_task_type("example", "Встрча")


def test_user_by_email_name_or_id(rows):
    assert find_user("example", "ANNA@example.com").amo_id == 581651
    assert find_user("example", "Иван Смирнов").email == "ivan@example.com"
    assert find_user("example", 581651).is_admin
    assert not find_user("example", "petr@example.com").is_active  # found; the caller decides


def test_user_miss_suggests_names_and_emails(rows):
    with pytest.raises(NotFound) as err:
        find_user("example", "ana@example.com")
    assert err.value.suggestions[0] == "anna@example.com"


def test_lead_custom_field_by_name_code_or_id(rows):
    assert find_custom_field("example", "source").amo_id == 501
    assert find_custom_field("example", "BUDGET").name == "Budget"
    assert find_custom_field("example", 502).type == "numeric"
    with pytest.raises(NotFound, match="no lead custom field 'Sourse' in account 'example' — did you mean 'Source'"):
        find_custom_field("example", "Sourse")


def test_suggestions_are_best_first_and_at_most_three():
    names = ["Qualified", "Qualification", "Quality", "Qualifier", "Lost"]
    got = suggest("Qualifed", names)
    assert got[0] == "Qualified" and len(got) == 3 and "Lost" not in got


# -- after a real sync -------------------------------------------------------------------------
def test_lookups_work_on_what_sync_entities_stored(store, fake, account):
    from amohook.amocrm.client import client_for

    fake.add_pipeline("Sales", ["Qualified"])
    assert sync_entities(store, client_for(store, "example")).ok
    stage = find_stage("example", "Sales", "Qualified")
    assert stage.pipeline_id == find_pipeline("example", "Sales").amo_id
    assert find_task_type("example", "FOLLOW_UP").amo_id == 1
    assert find_user("example", "manager@example.com").amo_id == 123123
