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
