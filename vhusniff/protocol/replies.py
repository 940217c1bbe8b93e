"""The reply rules, stated once: what a request waits for, given what the session negotiated. The analyzer matches
replies with them, replay decides with them when to wait for (or send) a reply."""
from __future__ import annotations

from ..model import Channel
from . import catalogue as cat
from .grammar import DecodeContext, Message, request_table


def protocol_feature_set(profile: cat.Profile, protocol_features: int, name: str) -> bool:
    """Whether the protocol feature `name` (as the profile numbers it) is set in a protocol-features word."""
    bit = profile.protocol_feature_bit(name)
    return bit is not None and bool(protocol_features >> bit & 1)


class Expect:
    """What a request waits for."""
    NOTHING = "nothing"
    REPLY = "reply"            # an explicit reply (always-replied requests, SET_LOG_BASE with LOG_SHMFD, postcopy)
    ACK = "ack"                # a REPLY_ACK u64 (NEED_REPLY with REPLY_ACK negotiated)
    MAYBE = "maybe"            # NEED_REPLY without REPLY_ACK: a reply is tolerated, not required


def expectation(message: Message, protocol_features: int, profile: cat.Profile = cat.SPEC_PROFILE,
                postcopy_listening: bool = False) -> str:
    """What a request waits for (an Expect), given the acked protocol features and whether postcopy listens.

    The one statement of the reply rules (ReplyExpectation): the analyzer matches replies with it, replay decides
    with it whether to wait for (or send) a reply. NEED_REPLY under REPLY_ACK asks for an ack of any request, one
    the catalogue does not know included."""
    rules = reply_rules(message.channel, message.request, message.need_reply, profile)
    return rules(protocol_features, postcopy_listening)


class ReplyExpectation:
    """The reply rules settled for one request header (its spec, channel, request number and NEED_REPLY bit)
    under one profile: calling it with the acked protocol features and whether postcopy listens says what the
    request waits for. `fixed` is that answer when nothing negotiated changes it (None otherwise), so that the
    analyzer asks it once per kind of request rather than once per message."""

    __slots__ = ("profile", "fixed", "log_shmfd_bit", "postcopy_reply", "need_reply", "reply_ack_bit")

    def __init__(self, spec: cat.RequestSpec | None, channel: Channel, request: int, need_reply: bool,
                 profile: cat.Profile = cat.SPEC_PROFILE) -> None:
        self.profile = profile              # held: reply_rules' cache knows it by its id
        # The protocol feature bits the answer may depend on; -1 where it does not (or the profile numbers none).
        self.log_shmfd_bit = _bit(profile, "LOG_SHMFD") if spec is not None and \
            spec.reply_rule == cat.ReplyRule.IF_LOG_SHMFD else -1
        self.reply_ack_bit = _bit(profile, "REPLY_ACK") if need_reply else -1
        # postcopy: the back-end answers with its mapping bases, without NEED_REPLY
        self.postcopy_reply = channel == Channel.MAIN and \
            request in (cat.FrontendRequest.SET_MEM_TABLE, cat.FrontendRequest.ADD_MEM_REG)
        self.need_reply = need_reply
        self.fixed: str | None = None
        if spec is not None and spec.reply_rule == cat.ReplyRule.ALWAYS:
            self.fixed = Expect.REPLY
        elif self.log_shmfd_bit < 0 and not self.postcopy_reply and self.reply_ack_bit < 0:
            self.fixed = Expect.MAYBE if need_reply else Expect.NOTHING

    def __call__(self, protocol_features: int, postcopy_listening: bool = False) -> str:
        if self.fixed is not None:
            return self.fixed
        if self.log_shmfd_bit >= 0 and protocol_features >> self.log_shmfd_bit & 1:
            return Expect.REPLY
        if postcopy_listening and self.postcopy_reply:
            return Expect.REPLY
        if self.need_reply:
            return Expect.ACK if self.reply_ack_bit >= 0 and protocol_features >> self.reply_ack_bit & 1 \
                else Expect.MAYBE
        return Expect.NOTHING


# Request headers seen, by (channel, request, NEED_REPLY, profile); forgotten all at once beyond this (a fuzzed
# capture's every request number keeps it bounded).
REPLY_RULES_KEPT = 4096
_reply_rules: dict[tuple[Channel, int, bool, int], ReplyExpectation] = {}


def reply_rules(channel: Channel, request: int, need_reply: bool,
                profile: cat.Profile = cat.SPEC_PROFILE) -> ReplyExpectation:
    """The ReplyExpectation of a request header under a profile, made once."""
    key = (channel, request, need_reply, id(profile))
    rules = _reply_rules.get(key)
    if rules is None or rules.profile is not profile:
        if len(_reply_rules) >= REPLY_RULES_KEPT:
            _reply_rules.clear()
        rules = _reply_rules[key] = ReplyExpectation(request_table(channel).get(request), channel, request,
                                                     need_reply, profile)
    return rules


def _bit(profile: cat.Profile, name: str) -> int:
    """The profile's bit for a protocol feature, -1 when it numbers none."""
    bit = profile.protocol_feature_bit(name)
    return -1 if bit is None else bit


def reply_required(message: Message, ctx: DecodeContext) -> bool:
    """Whether the protocol requires an answer to this request in this context (a reply or an ack)."""
    return expectation(message, ctx.protocol_features, ctx.profile) in (Expect.REPLY, Expect.ACK)
