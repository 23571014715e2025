"""openIMIS's own URLs in the Bundles it answers, rewritten to the mediator's public base (README "How a
request flows", step `link_rewrite`).

openIMIS builds `Bundle.link[].url` and `Bundle.entry[].fullUrl` from its own host and base path
(mediator.fhir.BaseUrlRewriter says how they are matched); a client must get the mediator's, both so
its next-page link comes back through the mediator and so openIMIS's internal address never leaves.
The `Location` header is rewritten earlier, where openIMIS's headers are allowlisted
(`OpenImisUpstream.answer`): it is one header and a batch entry needs it before its Bundle is built.

The answer's body is parsed once: an answer of openIMIS (`ParsedResponse`) carries the document parsed
on receipt, which is rewritten in place and serialised once; only an answer without one (an idempotent
replay from the store) is parsed here, and only when its bytes may hold the upstream base at all.
"""

from __future__ import annotations

from aiohttp import web

from mediator import json_codec
from mediator.fhir import FHIR_JSON, PLAIN_JSON, BaseUrlRewriter
from mediator.upstream import response_document


def rewrite_links(rewriter: BaseUrlRewriter, response: web.StreamResponse) -> web.StreamResponse:
    """`response` with its Bundle's links and fullUrls on the public base (the same object: its headers,
    status and parsed document stay); unchanged when it is not a JSON Bundle holding openIMIS's URLs."""
    if not isinstance(response, web.Response) or response.status >= 400 or \
            response.content_type not in (PLAIN_JSON, FHIR_JSON):
        return response   # openIMIS's errors were replaced by the mediator's own OperationOutcome
    body = response.body
    if not isinstance(body, bytes) or not body or not rewriter.may_need_rewriting(body):
        return response
    document = response_document(response)
    if not isinstance(document, dict) or not rewriter.rewrite_bundle(document):
        return response
    response.body = json_codec.dumps(document)
    return response
