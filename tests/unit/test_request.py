import pytest

from runtime.errors import InvalidRequest
from runtime.request import prompt_text, validate
from runtime.settings import Settings

S = Settings()


def ok(**over):
    req = {"model": "auto", "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}
    req.update(over)
    return req


@pytest.mark.parametrize("bad, field", [
    (ok(messages=[]), "messages"),
    (ok(messages=[{"role": "system", "content": "x"}]), "messages[0].role"),
    (ok(messages=[{"role": "assistant", "content": "x"}]), "messages[0].role"),
    (ok(messages=[{"role": "user", "content": "   "}]), "messages[0].content"),
    (ok(messages=[{"role": "user", "content": [{"text": "no type"}]}]), "messages[0].content[0]"),
    (ok(max_tokens=0), "max_tokens"),
    (ok(max_tokens=True), "max_tokens"),
    (ok(max_tokens=10**7), "max_tokens"),
    (ok(model="claude-imaginary-9"), "model"),
    (ok(temperature=0.5), "temperature"),
    (ok(top_p=0.9), "top_p"),
    (ok(top_k=5), "top_k"),
    (ok(frobnicate=1), "frobnicate"),
    (ok(stream=True), "stream"),
    (ok(metadata={"tenant": "x"}), "metadata"),
    (ok(system=5), "system"),
])
def test_bad_requests_fail_locally_with_the_field(bad, field):
    with pytest.raises(InvalidRequest) as exc:
        validate(bad, S)
    assert exc.value.field == field
    assert exc.value.request_id


def test_bad_priority_and_non_dict():
    with pytest.raises(InvalidRequest, match="priority"):
        validate(ok(), S, priority="urgent")
    with pytest.raises(InvalidRequest, match="dict"):
        validate(["not", "a", "dict"], S)


def test_normalised_request_keeps_params_and_sets_user():
    req = ok(system="be brief", model="claude-haiku-5-5")
    n = validate(req, S, user_id="u1", tenant="acme", priority="bulk", request_id="r-1")
    assert n.request_id == "r-1" and n.requested_model == "claude-haiku-5-5"
    assert "model" not in n.params and n.params["metadata"] == {"user_id": "u1"}
    assert n.tenant == "acme" and n.priority == "bulk" and n.max_tokens == 64
    assert "metadata" not in req  # the caller's dict is not mutated


def test_prompt_text_reads_system_and_user_turns():
    p = {"system": [{"type": "text", "text": "SYS"}], "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "text", "text": "c"}]}]}
    assert prompt_text(p) == "SYS\na\nc"
