"""The reply rules, stated once: what a request waits for, given what the session negotiated. The analyzer matches
replies with them, replay decides with them when to wait for (or send) a reply."""
from __future__ import annotations

from ..model import Channel
from . import catalogue as cat
from .grammar import DecodeContext, Message


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

    The one statement of the reply rules: the analyzer matches replies with it, replay decides with it whether
    to wait for (or send) a reply. NEED_REPLY under REPLY_ACK asks for an ack of any request, one the
    catalogue does not know included."""
    spec = message.spec

    def negotiated(name: str) -> bool:
        return protocol_feature_set(profile, protocol_features, name)

    if spec is not None and spec.reply_rule == cat.ReplyRule.ALWAYS:
        return Expect.REPLY
    if spec is not None and spec.reply_rule == cat.ReplyRule.IF_LOG_SHMFD and negotiated("LOG_SHMFD"):
        return Expect.REPLY
    if postcopy_listening and message.channel == Channel.MAIN and \
            message.request in (cat.FrontendRequest.SET_MEM_TABLE, cat.FrontendRequest.ADD_MEM_REG):
        return Expect.REPLY    # postcopy: the back-end answers with its mapping bases, without NEED_REPLY
    if message.need_reply:
        return Expect.ACK if negotiated("REPLY_ACK") else Expect.MAYBE
    return Expect.NOTHING


def reply_required(message: Message, ctx: DecodeContext) -> bool:
    """Whether the protocol requires an answer to this request in this context (a reply or an ack)."""
    return expectation(message, ctx.protocol_features, ctx.profile) in (Expect.REPLY, Expect.ACK)
