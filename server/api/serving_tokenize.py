"""vLLM's POST /tokenize and POST /detokenize.

/tokenize with `messages` renders the chat template exactly as /v1/chat/completions does, so its
`count` equals that endpoint's usage.prompt_tokens.
"""

from __future__ import annotations

from server.api.errors import BadRequest
from server.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.api.serving import ServingContext


class TokenizeServer:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        ctx = self.ctx
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequest("Send exactly one of 'prompt' or 'messages'", param="prompt")
        if body.messages is not None:
            tokens = ctx.chat_prompt_ids(body)
        else:
            assert body.prompt is not None
            tokens = ctx.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=ctx.max_model_len, tokens=tokens)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.ctx.check_model(body.model)
        self.ctx.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=self.ctx.decode(body.tokens))
