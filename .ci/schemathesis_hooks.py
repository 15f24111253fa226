"""Schemathesis hooks for .ci/schemathesis: make generated requests refer to the
seeded data as a real client would, so that schema-valid requests reach the rules
behind the ids instead of stopping at 404.

- Path ids: every other generated id is replaced by a seeded one of its kind (the
  others stay random: unknown ids must answer a documented 404).
- Body fields that name other records (`practice_id`, `programs`, `care_team`,
  `restricted_programs`, `sms_numbers[].gateway`) or must be a real phone number
  (`mobile_phone`, `sms_numbers[].number`) get seeded or valid values: the schema
  cannot list the platform's ids or every valid number.
- `date_of_birth` is kept between 1900 and today: "not in the future" moves with the
  clock, so no static schema can state it.
- Just before each call (`before_call`), what depends on the seeded records' state:
  a record keeps its own practice (and the programs and care team of that practice),
  SMS authentication starts for a patient with a mobile number, a deletion never
  removes a seeded record (later requests name them), and the Unread Message
  Reminder is turned on together with New Patient Message (a settings page sends
  both).
"""

import datetime
import itertools
import zlib

import schemathesis

SEEDED = {
    "patient_id": ["pat1", "pat2", "pat3", "pat4"],
    "practice_id": ["p1", "p2"],
    "user_id": ["u1", "u2", "u3"],
    "program_id": ["prog1"],
    "gateway_instance": ["loopback"],
}
PHONES = ["(201) 555-0123", "+12015550125", "201-555-0177"]
NUMBERS = ["+12015550100", "+12015550101", "(201) 555-0102"]

_turn = itertools.count()


def _pick(options, value):
    # A stable hash (Python's own is salted per process): the same seed, the same run.
    return options[zlib.crc32(str(value).encode()) % len(options)]


@schemathesis.hook
def map_path_parameters(context, path_parameters):
    if path_parameters and next(_turn) % 2 == 0:
        for name, value in list(path_parameters.items()):
            if name in SEEDED:
                path_parameters[name] = _pick(SEEDED[name], value)
    return path_parameters


@schemathesis.hook
def map_body(context, body):
    if not isinstance(body, dict):
        return body
    if "practice_id" in body:
        body["practice_id"] = "p1"
    for key in ("programs", "restricted_programs"):
        if isinstance(body.get(key), list):
            body[key] = ["prog1"] if body[key] else []
    if isinstance(body.get("care_team"), list):
        body["care_team"] = ["u1"] if body["care_team"] else []
    if isinstance(body.get("mobile_phone"), str) and body["mobile_phone"].strip():
        body["mobile_phone"] = _pick(PHONES, body["mobile_phone"])
    if isinstance(body.get("sms_numbers"), list):
        body["sms_numbers"] = [
            {"number": NUMBERS[i % len(NUMBERS)], "gateway": "loopback"}
            for i, _ in enumerate(body["sms_numbers"][: len(NUMBERS)])
        ]
    if isinstance(body.get("date_of_birth"), str):
        try:
            date = datetime.date.fromisoformat(body["date_of_birth"])
            low, high = datetime.date(1900, 1, 1), datetime.date.today()
            if not low <= date <= high:
                date = datetime.date(1900 + date.toordinal() % 120, date.month, min(date.day, 28))
            body["date_of_birth"] = date.isoformat()
        except ValueError:
            pass
    if isinstance(body.get("email"), str):
        body["email"] = "staff@clinic.example" if body["email"] else ""
    return body


@schemathesis.hook
def map_query(context, query):
    # A cursor is valid only as the API returned it (opaque): a generated one names no
    # page. Leave it out, as a client's first request does.
    if query and "cursor" in query:
        del query["cursor"]
    return query


# The practice of each seeded record, and what of that practice a body may name.
PRACTICE_OF = {
    "pat1": "p1", "pat2": "p1", "pat3": "p1", "pat4": "p2",
    "u1": "p1", "u2": "p1", "u3": "p2",
}
OF_PRACTICE = {
    "p1": {"programs": ["prog1"], "care_team": ["u1"]},
    "p2": {"programs": [], "care_team": ["u3"]},
}
WITH_MOBILE = ["pat1", "pat3"]


@schemathesis.hook
def before_call(context, case):
    method = case.operation.method.upper()
    path = case.operation.path
    params = case.path_parameters if case.path_parameters is not None else {}
    body = case.body if isinstance(case.body, dict) else None
    if method == "DELETE" and path.startswith("/v1/admin/"):
        for name, value in list(params.items()):
            if value in SEEDED.get(name, []):
                params[name] = f"gone-{value}"
    if params.get("program_id") in SEEDED["program_id"] and "practice_id" in params:
        params["practice_id"] = "p1"
    record = params.get("patient_id") or params.get("user_id")
    if body is not None and "practice_id" in body:
        practice = PRACTICE_OF.get(record, "p1")
        body["practice_id"] = practice
        for key in ("programs", "restricted_programs"):
            if body.get(key):
                body[key] = OF_PRACTICE[practice]["programs"]
        if body.get("care_team"):
            body["care_team"] = OF_PRACTICE[practice]["care_team"]
    if path.endswith("/sms/start") and not (body or {}).get("mobile_phone"):
        if params.get("patient_id") in SEEDED["patient_id"]:
            params["patient_id"] = _pick(WITH_MOBILE, params["patient_id"])
    if body is not None and body.get("unread_reminder") is True:
        body["new_patient_message"] = True
