"""Automatic prompt caching: placement, the prefix tracker, the 1 h TTL rule, reservation numbers, savings.

Token counts come from the fake API's own tokenizer (deterministic: "word " is one token), so a prompt's size
is set exactly; placements are checked against the fake API's request validation and its prompt cache.
"""

import copy
import pickle

import pytest
from hypothesis import HealthCheck, assume, given, settings as hsettings, strategies as st

from runtime import prompt_cache as pc
from runtime.errors import UnknownModel
from runtime.estimate import TokenEstimator
from runtime.fake_api.prompt_cache import PromptCache
from runtime.fake_api.tokenizer import count_prompt
from runtime.fake_api.validation import validate as api_validate
from runtime.pricing import max_cost, price
from runtime.settings import Settings
from runtime.usage import Usage

pytestmark = pytest.mark.pure

S = Settings()
SONNET = "claude-sonnet-5-5"        # minimum 1,024
OPUS = "claude-opus-5-5"            # minimum 512
M = 1_000_000


def count(body):
    return count_prompt(body, "v2")


def words(n, tag="w"):
    # "word" pieces are 4 letters: one v2 token each; the tag keeps texts of the same length apart
    return (tag + " ") + "word " * (n - 1)


def user(text):
    return {"role": "user", "content": text}


def asst(text):
    return {"role": "assistant", "content": text}


def tool(name, n=0):
    return {"name": name, "description": words(n, name) if n else name,
            "input_schema": {"type": "object", "properties": {}}}


def markers(params):
    """Every cache_control in the request, as (where, value)."""
    out = []
    for i, t in enumerate(params.get("tools") or ()):
        if t.get("cache_control"):
            out.append((f"tools.{i}", t["cache_control"]))
    system = params.get("system")
    for i, b in enumerate(system if isinstance(system, list) else ()):
        if b.get("cache_control"):
            out.append((f"system.{i}", b["cache_control"]))
    for i, m in enumerate(params.get("messages") or ()):
        for j, b in enumerate(m["content"] if isinstance(m["content"], list) else ()):
            if b.get("cache_control"):
                out.append((f"messages.{i}.{j}", b["cache_control"]))
    return out


def api_ok(params, model=SONNET):
    """The fake API's validation accepts the request (raises its 400 otherwise)."""
    api_validate({"model": model, "max_tokens": 16, **params}, S.models)


# --------------------------------------------------------------------------------------------- placement
def test_system_only_string_becomes_one_marked_block_and_input_is_untouched():
    params = {"max_tokens": 100, "system": words(2_000), "messages": [user("What is TCP?")]}
    before = copy.deepcopy(params)
    p = pc.plan(params, SONNET, S, count)
    assert params == before                                        # never mutated
    assert p.added and p.breakpoints_added == 1 and p.reason == ""
    assert p.params["system"] == [{"type": "text", "text": params["system"],
                                   "cache_control": {"type": "ephemeral"}}]
    assert p.params["messages"] == params["messages"]
    assert markers(p.params) == [("system.0", {"type": "ephemeral"})]
    assert p.prefix_tokens == count({"system": params["system"]}) == 2_000
    assert p.ttl == "5m" and p.max_ttl == "5m" and p.cacheable_tokens == 2_000
    assert [b.kind for b in p.boundaries] == ["system"] and p.boundaries[0].marker == "auto"
    api_ok(p.params)


def test_tools_only_marks_the_last_tool():
    params = {"max_tokens": 100, "tools": [tool("a", 600), tool("b", 600)], "messages": [user("go")]}
    before = copy.deepcopy(params)
    p = pc.plan(params, SONNET, S, count)
    assert params == before
    assert markers(p.params) == [("tools.1", {"type": "ephemeral"})]
    assert p.params["tools"][0] is params["tools"][0]               # unchanged parts are shared, not copied
    assert p.prefix_tokens == count({"tools": params["tools"]}) >= 1_024
    api_ok(p.params)


def test_tools_and_system_mark_both_boundaries_longest_tracked():
    params = {"tools": [tool("a", 1_100)], "system": words(1_500), "messages": [user("go")]}
    p = pc.plan(params, SONNET, S, count)
    assert [w for w, _ in markers(p.params)] == ["tools.0", "system.0"]
    assert p.prefix_hash == p.boundaries[1].hash and p.boundaries[1].kind == "system"
    assert p.prefix_tokens == count({"tools": params["tools"], "system": params["system"]})
    # a tools prefix under the minimum gets no marker of its own, the system boundary still does
    small = {"tools": [tool("a", 10)], "system": words(1_500), "messages": [user("go")]}
    assert [w for w, _ in markers(pc.plan(small, SONNET, S, count).params)] == ["system.0"]


def test_multi_turn_marks_the_earlier_turns_and_the_system():
    msgs = [user(words(300, "q1")), asst(words(400, "a1")), user(words(300, "q2")), asst(words(400, "a2")),
            user("and now?")]
    params = {"system": words(1_100), "messages": msgs}
    before = copy.deepcopy(params)
    p = pc.plan(params, SONNET, S, count)
    assert params == before
    # the marker ends the prefix at the last turn before the new user turn; a string content became a block
    assert [w for w, _ in markers(p.params)] == ["system.0", "messages.3.0"]
    assert p.params["messages"][3]["content"] == [{"type": "text", "text": msgs[3]["content"],
                                                   "cache_control": {"type": "ephemeral"}}]
    assert p.params["messages"][4] is msgs[4]                      # the new turn is left as it came
    # earlier turns all in block form, so the next turn spells this prefix the same way
    assert p.params["messages"][0]["content"] == [{"type": "text", "text": msgs[0]["content"]}]
    assert p.boundaries[-1].kind == "turns" and p.prefix_hash == p.boundaries[-1].hash
    assert p.prefix_tokens == count({"system": params["system"], "messages": msgs[:4]})
    api_ok(p.params)


def test_single_turn_has_no_turns_boundary_and_prefill_is_tail():
    params = {"system": words(1_100), "messages": [user(words(3_000)), asst("Sure,")]}
    p = pc.plan(params, SONNET, S, count)
    assert [b.kind for b in p.boundaries] == ["system"]
    assert [w for w, _ in markers(p.params)] == ["system.0"]


def test_below_minimum_adds_nothing_and_returns_the_same_dict():
    params = {"system": words(1_000), "messages": [user("hi")]}
    p = pc.plan(params, SONNET, S, count)
    assert p.params is params and not p.added and p.reason == "below-minimum"
    assert p.prefix_hash is None and p.prefix_tokens == 0 and p.cacheable_tokens == 0 and p.max_ttl is None
    # the minimum is per model: Opus 5.5 caches from 512
    assert pc.plan(params, OPUS, S, count).added
    assert not pc.plan({"messages": [user(words(5_000))]}, SONNET, S, count).added  # no stable prefix at all
    assert pc.plan({"messages": [user(words(5_000))]}, SONNET, S, count).reason == "no-prefix"


def test_minimum_is_configuration():
    s = Settings(models={SONNET: {"model_class": "sonnet", "prices": [{"input": 2, "output": 10}],
                                  "min_cache_tokens": 4_000}})
    params = {"system": words(2_000), "messages": [user("hi")]}
    assert pc.plan(params, SONNET, S, count).added
    assert not pc.plan(params, SONNET, s, count).added


def test_user_markers_are_left_alone_and_their_boundary_not_marked_again():
    params = {"system": [{"type": "text", "text": words(1_500), "cache_control": {"type": "ephemeral",
                                                                                    "ttl": "1h"}}],
              "messages": [user(words(200, "q")), asst(words(1_000, "a")), user("next")]}
    before = copy.deepcopy(params)
    p = pc.plan(params, SONNET, S, count)
    assert params == before
    assert markers(p.params) == [("system.0", {"type": "ephemeral", "ttl": "1h"}),
                                 ("messages.1.0", {"type": "ephemeral"})]
    assert p.boundaries[0].marker == "user" and p.boundaries[1].marker == "auto"
    # only the user's boundary: nothing to add, but the user's prefix is still tracked, with its TTL
    only = {"system": params["system"], "messages": [user("q")]}
    q = pc.plan(only, SONNET, S, count)
    assert q.params is only and not q.added and q.reason == "user-marked"
    assert q.prefix_hash == p.boundaries[0].hash and q.ttl == "1h" and q.max_ttl == "1h"


def test_four_breakpoints_in_all_counting_the_users():
    def umark(text):
        return {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}

    msgs = [{"role": "user", "content": [umark(words(100, "u1"))]}, asst(words(100, "a1")),
            {"role": "user", "content": [umark(words(100, "u2"))]}, asst(words(100, "a2")),
            {"role": "user", "content": [umark("latest question")]}]
    params = {"tools": [tool("a", 1_100)], "system": words(1_100), "messages": msgs}
    p = pc.plan(params, SONNET, S, count)
    # the user holds 3 of 4: one left, for the longest boundary (the earlier turns)
    assert p.breakpoints_added == 1
    assert [w for w, _ in markers(p.params)] == ["messages.0.0", "messages.2.0", "messages.3.0",
                                                 "messages.4.0"]
    # a user marker in the last turn: the whole prompt may be written
    assert p.cacheable_tokens is None
    msgs4 = msgs[:4] + [{"role": "user", "content": [umark("q"), umark("r")]}]
    full = pc.plan({**params, "messages": msgs4}, SONNET, S, count)
    assert full.params["messages"] is msgs4 and not full.added and full.reason == "no-breakpoints-left"
    # with two left, the two longest boundaries get them
    two = pc.plan({**params, "messages": [msgs[0], msgs[1], msgs[2], msgs[3], user("q")]}, SONNET, S, count)
    assert [b.kind for b in two.boundaries if b.marker == "auto"] == ["system", "turns"]


def test_markers_inside_tool_results_and_at_top_level_count_and_bound_what_may_be_written():
    result = {"type": "tool_result", "tool_use_id": "t1",
              "content": [{"type": "text", "text": words(50, "r"), "cache_control": {"type": "ephemeral"}}]}
    msgs = [user(words(600, "q")), {"role": "assistant", "content": [{"type": "tool_use", "id": "t1",
                                                                      "name": "a", "input": {}}]},
            {"role": "user", "content": [result]}, asst(words(600, "a")), user("next")]
    params = {"tools": [tool("a", 10)], "messages": msgs}
    p = pc.plan(params, SONNET, S, count)
    assert p.added and [w for w, _ in markers(p.params)] == ["messages.3.0"]
    # the user's marker sits inside the earlier turns: what may be written ends at the turns boundary
    assert p.cacheable_tokens == p.boundaries[-1].tokens
    api_ok(p.params)
    top = pc.plan({**params, "cache_control": {"type": "ephemeral"}}, SONNET, S, count)
    assert top.cacheable_tokens is None                            # automatic caching: the whole prompt
    many = pc.plan({**params, "cache_control": {"type": "ephemeral"},
                    "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}},
                               {"type": "text", "text": "t", "cache_control": {"type": "ephemeral"}}]},
                   SONNET, S, count)
    assert not many.added and many.reason == "no-breakpoints-left"   # 2 system + 1 nested + 1 top-level


def test_ttl_order_with_users_markers_is_kept():
    # the API wants 1 h markers before 5 m ones: a user's 5 m system marker forbids a 1 h marker after it
    params = {"system": [{"type": "text", "text": words(1_500), "cache_control": {"type": "ephemeral"}}],
              "messages": [user(words(200, "q")), asst(words(1_000, "a")), user("next")]}
    p = pc.plan(params, SONNET, S, count, ttl="1h")
    assert markers(p.params)[1] == ("messages.1.0", {"type": "ephemeral"})
    # and a user's 1 h marker late in the prompt forbids a 5 m one before it: ours becomes 1 h
    late = {"system": words(1_500),
            "messages": [user(words(10, "q")),
                         {"role": "assistant", "content": [{"type": "text", "text": words(10, "a"),
                                                            "cache_control": {"type": "ephemeral",
                                                                              "ttl": "1h"}}]},
                         user("next")]}
    q = pc.plan(late, SONNET, S, count)
    assert markers(q.params)[0] == ("system.0", {"type": "ephemeral", "ttl": "1h"})


def test_with_ttl_remarks_only_the_added_markers():
    params = {"tools": [tool("a", 1_100)], "system": words(1_500), "messages": [user("go")]}
    p = pc.plan(params, SONNET, S, count)
    h = p.with_ttl("1h")
    assert [cc for _, cc in markers(h.params)] == [{"type": "ephemeral", "ttl": "1h"}] * 2
    assert h.ttl == "1h" and h.max_ttl == "1h" and h.prefix_hash == p.prefix_hash
    assert h.with_ttl("5m").params == p.params
    assert params == {"tools": [tool("a", 1_100)], "system": words(1_500), "messages": [user("go")]}


def test_thinking_block_cannot_carry_a_marker():
    msgs = [user(words(1_100, "q")),
            {"role": "assistant", "content": [{"type": "text", "text": "ok"},
                                              {"type": "thinking", "thinking": "hmm", "signature": "x"}]},
            user("next")]
    p = pc.plan({"messages": msgs}, SONNET, S, count)
    assert not p.added and p.reason == "unmarkable"


def test_off_and_per_request_override():
    params = {"system": words(2_000), "messages": [user("hi")]}
    off = Settings(prompt_caching="off")
    for p in (pc.plan(params, SONNET, off, count), pc.plan(params, SONNET, S, count, prompt_cache=False)):
        assert p.params is params and not p.added and p.prefix_hash is None and p.reason == "off"
        # nothing was inspected, so the budget bound must assume any user marker at its dearest
        assert p.cacheable_tokens is None and p.max_ttl == "1h"
    assert pc.plan(params, SONNET, off, count, prompt_cache=True).added


def test_prefix_hash_ignores_markers_and_content_shape_but_not_model_text_or_scope():
    sys_text = words(2_000)
    a = pc.plan({"system": sys_text, "messages": [user("one")]}, SONNET, S, count)
    b = pc.plan({"system": [{"type": "text", "text": sys_text, "cache_control": {"type": "ephemeral"}}],
                 "messages": [user("a different question")]}, SONNET, S, count)
    assert a.prefix_hash == b.prefix_hash                          # the new user turn is not in the prefix
    assert a.prefix_hash != pc.plan({"system": sys_text, "messages": [user("one")]}, OPUS, S, count).prefix_hash
    assert a.prefix_hash != pc.plan({"system": sys_text + "!", "messages": [user("one")]}, SONNET, S,
                                    count).prefix_hash
    assert a.prefix_hash != pc.plan({"system": sys_text, "messages": [user("one")]}, SONNET, S, count,
                                    scope="key-2").prefix_hash
    # earlier turns: tool_choice and thinking changes make the API miss cached turns, so they split the hash
    msgs = [user(words(600, "q")), asst(words(600, "a")), user("next")]
    t1 = pc.plan({"messages": msgs}, SONNET, S, count).prefix_hash
    t2 = pc.plan({"messages": msgs, "tool_choice": {"type": "any"}}, SONNET, S, count).prefix_hash
    assert t1 is not None and t1 != t2


def test_estimator_works_as_the_counter_and_unknown_model_is_an_error():
    params = {"system": words(2_000), "messages": [user("hi")]}
    p = pc.plan(params, SONNET, S, TokenEstimator())
    assert p.added and p.prefix_tokens > 1_024
    with pytest.raises(UnknownModel):
        pc.plan(params, "claude-nope", S, count)


def test_plans_pickle():
    p = pc.plan({"system": words(2_000), "messages": [user("hi")]}, SONNET, S, count)
    q = pickle.loads(pickle.dumps(p))
    assert q == p and q.with_ttl("1h").params == p.with_ttl("1h").params


def test_shared_system_prompt_against_the_fake_apis_cache_one_write_then_reads():
    """What the placement earns on the fake API's own cache model: 1 write and 29 reads for 30 unique
    questions sharing a system prompt; a conversation's next turn reads its previous turn."""
    now = [0.0]
    cache = PromptCache(lambda: now[0], min_tokens=S.models[SONNET].min_cache_tokens)
    sys_text = words(5_000)
    writes = reads = 0
    for i in range(30):
        p = pc.plan({"system": sys_text, "messages": [user(f"question number {i}")]}, SONNET, S, count)
        cp = cache.plan("k\x00" + SONNET, p.params, "v2")
        cache.commit(cp)
        writes += cp.write > 0
        reads += cp.read >= 5_000
        now[0] += 1.0
    assert (writes, reads) == (1, 29)
    msgs = [user(words(700, "q1")), asst(words(700, "a1")), user("q2")]
    cp = cache.plan("k\x00" + SONNET, pc.plan({"system": sys_text, "messages": msgs}, SONNET, S, count).params,
                    "v2")
    cache.commit(cp)
    assert cp.read >= 5_000 and cp.write > 0                       # read the system, wrote the turns
    msgs2 = msgs[:2] + [user("q2"), asst(words(300, "a2")), user("q3")]
    cp2 = cache.plan("k\x00" + SONNET, pc.plan({"system": sys_text, "messages": msgs2}, SONNET, S,
                                               count).params, "v2")
    assert cp2.read > cp.read                                      # the previous turn's prefix is read


# ------------------------------------------------------------------------------------------------ tracker
P, MODEL = "prefixhash", SONNET


def test_tracker_lead_wait_then_warm():
    t = pc.PrefixTracker(S)
    d = t.begin(P, MODEL, 0.0, prefix_tokens=5_000)
    assert d.kind == "lead" and d.token is not None and d.ttl == "5m"
    w = t.begin(P, MODEL, 0.2)
    assert w.kind == "wait" and w.until == pytest.approx(0.2 + S.prompt_cache.write_wait_s)
    assert w.poll_s == S.prompt_cache.wait_poll_s and w.token is None
    assert t.begin(P, OPUS, 0.2).kind == "lead"                    # keyed by model too
    assert t.finish(P, MODEL, True, False, 0.5, ttl="5m", token=d.token) is True   # wake the waiters
    assert t.begin(P, MODEL, 0.6).kind == "warm"
    assert t.is_warm(P, MODEL, 0.6)


def test_tracker_warm_expires_after_ttl_minus_margin_and_reads_refresh():
    t = pc.PrefixTracker(S)
    margin = S.prompt_cache.warm_margin_s
    d = t.begin(P, MODEL, 0.0)
    t.finish(P, MODEL, True, False, 1.0, ttl="5m", token=d.token)
    assert t.begin(P, MODEL, 1.0 + 300 - margin - 0.01).kind == "warm"
    # a read refreshes the entry's 5 minutes
    t.finish(P, MODEL, False, True, 200.0)
    assert t.begin(P, MODEL, 200.0 + 300 - margin - 0.01).kind == "warm"
    assert t.begin(P, MODEL, 200.0 + 300 - margin + 0.01).kind == "lead"   # expired: write again


def test_tracker_one_hour_entry_stays_warm():
    t = pc.PrefixTracker(S)
    d = t.begin(P, MODEL, 0.0)
    t.finish(P, MODEL, True, False, 0.0, ttl="1h", token=d.token)
    assert t.begin(P, MODEL, 3_000.0) == pc.Decision("warm", "1h")
    assert t.begin(P, MODEL, 3_600.0).kind == "lead"


def test_tracker_wait_is_bounded_by_deadline_and_by_write_wait_since_first_ask():
    t = pc.PrefixTracker(S)
    t.begin(P, MODEL, 0.0)
    assert t.begin(P, MODEL, 1.0, deadline=2.0).until == 2.0
    assert t.begin(P, MODEL, 1.0, deadline=0.5) == pc.Decision("pass", "5m", reason="wait-exhausted")
    # re-asking with the first ask's time: the whole wait is bounded by write_wait_s, not each re-ask
    first = 1.0
    w = t.begin(P, MODEL, 4.0, waiting_since=first)
    assert w.kind == "wait" and w.until == first + S.prompt_cache.write_wait_s
    assert t.begin(P, MODEL, first + S.prompt_cache.write_wait_s, waiting_since=first).kind == "pass"
    # write_wait_s=0 turns single-flight off: nobody waits
    t0 = pc.PrefixTracker(Settings(prompt_cache={"write_wait_s": 0}))
    t0.begin(P, MODEL, 0.0)
    assert t0.begin(P, MODEL, 0.1).kind == "pass"


def test_tracker_lease_frees_a_leader_that_never_finishes_and_stale_finish_is_harmless():
    t = pc.PrefixTracker(S)
    lease = S.prompt_cache.write_lease_s
    first = t.begin(P, MODEL, 0.0)
    assert t.begin(P, MODEL, lease - 0.01, waiting_since=lease - 0.01).kind == "wait"
    second = t.begin(P, MODEL, lease)
    assert second.kind == "lead" and second.token != first.token
    # the first leader's answer arrives late: its write makes the prefix warm all the same
    assert t.finish(P, MODEL, True, False, lease + 1, token=first.token) is True
    assert t.begin(P, MODEL, lease + 2).kind == "warm"
    assert t.finish(P, MODEL, False, True, lease + 3, token=second.token) is False   # nothing in flight


def test_tracker_abandon_frees_at_once_only_for_the_holder():
    t = pc.PrefixTracker(S)
    d = t.begin(P, MODEL, 0.0)
    assert t.abandon(P, MODEL, d.token + 1, 0.5) is False
    assert t.begin(P, MODEL, 0.6).kind == "wait"
    assert t.abandon(P, MODEL, d.token, 0.7) is True
    nxt = t.begin(P, MODEL, 0.8)
    assert nxt.kind == "lead" and nxt.token != d.token
    assert t.abandon("never-seen", MODEL, 1, 0.9) is False


def test_tracker_marks_a_prefix_the_api_ignored_as_uncacheable_for_a_while():
    t = pc.PrefixTracker(S)
    d = t.begin(P, MODEL, 0.0)
    assert t.finish(P, MODEL, False, False, 1.0, token=d.token) is True
    assert t.begin(P, MODEL, 2.0).kind == "pass" and t.begin(P, MODEL, 2.0).reason == "uncacheable"
    assert t.begin(P, MODEL, 1.0 + S.prompt_cache.uncacheable_s + 0.01).kind == "lead"


def test_tracker_forgets_idle_prefixes_and_caps_its_size():
    t = pc.PrefixTracker(Settings(prompt_cache={"max_prefixes": 3}))
    for i in range(5):
        t.begin(f"p{i}", MODEL, float(i))
    assert len(t) == 3 and t.state("p0", MODEL) is None and t.state("p4", MODEL) is not None
    t.begin("p2", MODEL, 10.0)                                      # touched: now the most recent
    t.begin("p5", MODEL, 11.0)
    assert t.state("p2", MODEL) is not None and t.state("p3", MODEL) is None
    assert t.prune(11.0 + S.prompt_cache.forget_after_s + 1) == 3 and len(t) == 0


def test_tracker_pickles_with_its_state():
    t = pc.PrefixTracker(S)
    d = t.begin(P, MODEL, 0.0)
    t.finish(P, MODEL, True, False, 1.0, token=d.token)
    u = pickle.loads(pickle.dumps(t))
    assert u.state(P, MODEL) == t.state(P, MODEL) and u.begin(P, MODEL, 2.0).kind == "warm"
    assert u.begin(P, OPUS, 2.0).token == d.token + 1                # tokens keep counting


def test_outcome_reads_usage_shapes():
    assert pc.outcome(Usage(cache_write_5m_tokens=10)) == (True, False)
    assert pc.outcome({"input_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 9}) == \
        (False, True)
    assert pc.outcome({"input_tokens": 5}) == (False, False)


# ----------------------------------------------------------------------------------------------- TTL rule
def test_ttl_rule_picks_five_minutes_for_dense_or_rare_reuse():
    assert pc.choose_ttl([], 5_000, SONNET, S) == "5m"
    assert pc.choose_ttl([1.0, 30.0, 200.0] * 5, 5_000, SONNET, S) == "5m"      # always within 5 minutes
    assert pc.choose_ttl([5_000.0, 7_200.0, 4_000.0], 5_000, SONNET, S) == "5m"  # beyond 1 h: both write
    assert pc.choose_ttl([600.0], 5_000, SONNET, S) == "5m"                     # one long gap is not a habit


def test_ttl_rule_picks_one_hour_when_reuse_gaps_exceed_five_minutes_and_it_pays():
    # two 10-minute gaps: 5 m pays 3 writes (3.75x input), 1 h one write and two reads (2.2x)
    assert pc.choose_ttl([600.0, 600.0], 5_000, SONNET, S) == "1h"
    assert pc.choose_ttl([10.0, 600.0, 5.0, 900.0, 20.0], 5_000, SONNET, S) == "1h"
    # same multipliers on Haiku 5.5's published cache rates
    assert pc.choose_ttl([600.0, 600.0], 5_000, "claude-haiku-5-5", S) == "1h"
    # mostly gaps past 1 h: each is a 2x write under 1 h against 1.25x under 5 m
    assert pc.choose_ttl([600.0, 600.0] + [7_200.0] * 6, 5_000, SONNET, S) == "5m"


def test_ttl_rule_follows_the_price_tier_and_can_be_switched_off():
    # a price list where a 1 h write costs 10x input: never worth it for two long gaps
    dear = Settings(models={SONNET: {"model_class": "sonnet", "prices": [{"input": 2, "output": 10,
                                                                           "cache_write_1h": 20}]}})
    assert pc.choose_ttl([600.0, 600.0], 5_000, SONNET, dear) == "5m"
    assert pc.choose_ttl([600.0, 600.0], 5_000, SONNET, Settings(prompt_cache={"ttl_1h": False})) == "5m"


def test_tracker_feeds_the_ttl_rule_from_observed_gaps():
    t = pc.PrefixTracker(S)
    now = 0.0
    for _ in range(3):
        d = t.begin(P, MODEL, now, prefix_tokens=5_000)
        assert d.kind == "lead"
        t.finish(P, MODEL, True, False, now, ttl=d.ttl, token=d.token)
        now += 600.0                                               # back after 10 minutes: expired
    assert t.state(P, MODEL).gaps == [600.0, 600.0]
    d = t.begin(P, MODEL, now, prefix_tokens=5_000)
    assert d == pc.Decision("lead", "1h", token=d.token)
    t.finish(P, MODEL, True, False, now, ttl="1h", token=d.token)
    assert t.begin(P, MODEL, now + 600.0).kind == "warm"            # the 1 h entry bridges the next gap


# ------------------------------------------------------------------------------- admission and reservation
def test_admission_reserves_only_the_uncached_part_of_a_warm_prefix():
    assert pc.admission_input_tokens(5_100, 5_000) == 100
    assert pc.admission_input_tokens(5_100, 0) == 5_100            # cold: the write counts toward ITPM
    assert pc.admission_input_tokens(100, 5_000) == 0


def test_reservation_numbers_for_warm_and_cold():
    params = {"system": words(5_000), "messages": [user("hi")]}
    p = pc.plan(params, SONNET, S, count)
    est = count({**params})
    warm = pc.reservation(p, pc.Decision("warm", "5m"), est, 1_000, SONNET, S)
    cold = pc.reservation(p, pc.Decision("lead", "5m", token=1), est, 1_000, SONNET, S)
    assert warm.itpm_tokens == est - 5_000 and cold.itpm_tokens == est
    tail = est - 5_000
    assert warm.expected_usd == pytest.approx((tail * 2 + 5_000 * 0.2 + 1_000 * 10) / M)
    assert cold.expected_usd == pytest.approx((tail * 2 + 5_000 * 2.5 + 1_000 * 10) / M)
    # the budget bound does not trust the warm belief: both cover a write of the prefix
    assert warm.bound_usd == cold.bound_usd
    believed_warm_was_cold = price(Usage(input_tokens=tail, cache_write_5m_tokens=5_000, output_tokens=1_000),
                                   SONNET, S).total_usd
    assert warm.expected_usd < believed_warm_was_cold <= warm.bound_usd
    # and it is tighter than pricing.max_cost, which prices every input token as a 1 h write
    assert warm.bound_usd < max_cost(SONNET, est, 1_000, S)
    hour = pc.reservation(p.with_ttl("1h"), pc.Decision("lead", "1h", token=1), est, 1_000, SONNET, S)
    assert hour.bound_usd > cold.bound_usd and hour.expected_usd > cold.expected_usd
    assert price(Usage(input_tokens=tail, cache_write_1h_tokens=5_000, output_tokens=1_000), SONNET,
                 S).total_usd <= hour.bound_usd


def test_budget_bound_without_markers_prices_input_only_and_off_plan_matches_max_cost():
    b = pc.budget_bound(SONNET, 1_000, 100, S, cacheable_tokens=0, ttl=None)
    assert b == pytest.approx((1_300 * 2 + 100 * 10) / M)
    off = pc.plan({"system": words(5_000), "messages": [user("hi")]}, SONNET, S, count, prompt_cache=False)
    r = pc.reservation(off, None, 6_000, 100, SONNET, S)
    assert r.bound_usd == pytest.approx(max_cost(SONNET, 6_000, 100, S))


def test_budget_bound_takes_the_dearest_tier_a_prompt_can_reach():
    # Haiku 5.5: 100k tokens estimated may be 130k real, in the dearer long-context tier
    b = pc.budget_bound("claude-haiku-5-5", 100_000, 0, S, cacheable_tokens=0, ttl=None)
    assert b == pytest.approx(130_000 * 0.50 / M)


models = st.sampled_from(sorted(S.models))


@st.composite
def scenarios(draw):
    model = draw(models)
    est = draw(st.integers(0, 300_000))
    cacheable = draw(st.one_of(st.none(), st.integers(0, est)))
    ttl = draw(st.sampled_from(["5m", "1h", None]))
    max_tokens = draw(st.integers(0, 64_000))
    batch = draw(st.booleans())
    h = S.prompt_cache.estimate_headroom
    n = draw(st.integers(0, int(est * h)))                          # real prompt: up to headroom x estimate
    c_max = n if cacheable is None else min(n, int(cacheable * h))
    cached = 0 if ttl is None else draw(st.integers(0, c_max))      # tokens the cache touched (at markers)
    # any outcome: all written (cold), all read (warm), or a mix (partly warm)
    write = draw(st.integers(0, cached))
    read = cached - write
    w1 = draw(st.integers(0, write)) if ttl == "1h" else 0
    usage = Usage(input_tokens=n - cached, output_tokens=draw(st.integers(0, max_tokens)),
                  cache_write_5m_tokens=write - w1, cache_write_1h_tokens=w1, cache_read_tokens=read)
    return model, est, cacheable, ttl, max_tokens, batch, usage


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_budget_bound_is_a_true_upper_bound_for_every_cache_outcome(sc):
    model, est, cacheable, ttl, max_tokens, batch, usage = sc
    bound = pc.budget_bound(model, est, max_tokens, S, cacheable_tokens=cacheable, ttl=ttl, batch=batch)
    real = price(usage, model, S, batch=batch).total_usd
    assert real <= bound * (1 + 1e-12) + 1e-12
    # never above today's reservation, which ignores the cache
    assert bound <= max_cost(model, est, max_tokens, S, batch=batch) * (1 + 1e-12) + 1e-12


@hsettings(max_examples=150, deadline=None)
@given(sys_n=st.integers(1, 9_000), turns=st.integers(0, 3), tail_n=st.integers(1, 2_000), model=models,
       warm=st.booleans(), partial=st.floats(0, 1))
def test_reservation_from_a_plan_bounds_any_outcome(sys_n, turns, tail_n, model, warm, partial):
    """End to end through ``plan``: the fake API's tokenizer counts exactly, so the headroom is unused."""
    msgs = []
    for k in range(turns):
        msgs += [user(words(50, f"q{k}")), asst(words(80, f"a{k}"))]
    params = {"system": words(sys_n), "messages": msgs + [user(words(tail_n, "tail"))]}
    p = pc.plan(params, model, S, count)
    est = count(params)
    r = pc.reservation(p, pc.Decision("warm" if warm else "lead", "5m"), est, 500, model, S)
    cacheable = est if p.cacheable_tokens is None else p.cacheable_tokens
    read = int(cacheable * partial) if p.added else 0
    for usage in (Usage(input_tokens=est - cacheable, cache_write_5m_tokens=cacheable, output_tokens=500),
                  Usage(input_tokens=est - cacheable, cache_write_5m_tokens=cacheable - read,
                        cache_read_tokens=read, output_tokens=500),
                  Usage(input_tokens=est, output_tokens=500)):
        assume(p.added or usage.cache_write_tokens == 0)
        assert price(usage, model, S).total_usd <= r.bound_usd * (1 + 1e-12)


# ------------------------------------------------------------------------------------------------ savings
def test_savings_against_uncached_input():
    # Sonnet 5.5 at $2/M: a read saves 0.9x, a 5 m write costs 0.25x more, a 1 h write 1x more
    assert pc.savings(Usage(cache_read_tokens=M), SONNET, S) == pytest.approx(1.8)
    assert pc.savings(Usage(cache_write_5m_tokens=M), SONNET, S) == pytest.approx(-0.5)
    assert pc.savings(Usage(cache_write_1h_tokens=M), SONNET, S) == pytest.approx(-2.0)
    assert pc.savings(Usage(input_tokens=M, output_tokens=M), SONNET, S) == 0
    assert pc.savings(Usage(cache_read_tokens=M), SONNET, S, batch=True) == pytest.approx(0.9)
    # the tier is the whole prompt's: 100k cache reads + 10 input put Haiku 5.5 in its $0.50 tier
    assert pc.savings(Usage(input_tokens=10, cache_read_tokens=100_000), "claude-haiku-5-5", S) == \
        pytest.approx(100_000 * (0.50 - 0.05) / M)
    # from the API's usage dict, as the ledger sees it
    assert pc.savings({"input_tokens": 50, "cache_read_input_tokens": 5_000, "cache_creation_input_tokens": 0},
                      SONNET, S) == pytest.approx(5_000 * 1.8 / M)


def test_savings_equal_uncached_price_minus_real_price():
    u = Usage(input_tokens=300, output_tokens=200, cache_write_5m_tokens=4_000, cache_read_tokens=9_000)
    uncached = Usage(input_tokens=u.prompt_tokens, output_tokens=200)
    assert pc.savings(u, SONNET, S) == pytest.approx(price(uncached, SONNET, S).total_usd
                                                     - price(u, SONNET, S).total_usd)


# ----------------------------------------------------------------------------------------------- settings
def test_minimum_cacheable_lengths_follow_the_published_figures():
    mins = {m: i.min_cache_tokens for m, i in S.models.items()}
    assert mins["claude-opus-5"] == mins["claude-fable-5-1"] == 512
    assert mins["claude-sonnet-5-5"] == mins["claude-sonnet-4-6"] == 1_024
    assert mins["claude-opus-4-1"] == 1_024
    assert mins["claude-haiku-4-5"] == mins["claude-opus-4-5"] == mins["claude-opus-4-6"] == 4_096
    assert mins["claude-haiku-5-5"] == 4_096
    assert S.prompt_caching == "auto" and S.prompt_cache.max_breakpoints == 4


def test_prompt_caching_from_environment(monkeypatch):
    monkeypatch.setenv("CLAUDE_RUNTIME_PROMPT_CACHING", "off")
    monkeypatch.setenv("CLAUDE_RUNTIME_PROMPT_CACHE__WRITE_WAIT_S", "2.5")
    s = Settings()
    assert s.prompt_caching == "off" and s.prompt_cache.write_wait_s == 2.5
    monkeypatch.setenv("CLAUDE_RUNTIME_PROMPT_CACHING", "sometimes")
    with pytest.raises(ValueError, match="prompt_caching"):
        Settings()
