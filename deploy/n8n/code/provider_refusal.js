// Code node "Provider refusal": the Twilio node's error output. n8n keeps only the error's
// message, one per HTTP status or network error (n8n-workflow's NodeApiError), so the message
// tells whether Twilio answered, and so whether the SMS can have been created.
// "release": Twilio did not take the SMS; the claim is dropped so the dispatcher's retry can
// send. "unknown": it may have; the key stays claimed and is never sent again.
const REFUSALS = [
  // [message start, what it means, answer to the dispatcher]
  ['The service is receiving too many requests', 'release', 429, 'provider_rate_limited'],
  ['Bad request', 'release', 422, 'provider_refused'],
  ['Your request is invalid', 'release', 422, 'provider_refused'],
  ['Authorization failed', 'release', 502, 'provider_credentials'],
  ['Forbidden', 'release', 502, 'provider_credentials'],
  // Messages.json of an account that does not exist: the Account SID is wrong.
  ['The resource you are requesting could not be found', 'release', 502, 'provider_credentials'],
  ['Payment required', 'release', 502, 'provider_account'],
  ['The service was not able to process your request', 'release', 503, 'provider_unavailable'],
  ['The service failed to process your request', 'release', 503, 'provider_unavailable'],
  ['Bad gateway', 'release', 503, 'provider_unavailable'],
  ['Service unavailable', 'release', 503, 'provider_unavailable'],
  // The connection never opened: nothing reached Twilio.
  ['The service refused the connection', 'release', 503, 'provider_unreachable'],
  ['The connection cannot be established', 'release', 503, 'provider_unreachable'],
  ['The host is unreachable', 'release', 503, 'provider_unreachable'],
  ['The DNS server returned an error', 'release', 503, 'provider_unreachable'],
];
// Anything else (a timeout, a reset connection, a 504) may have reached Twilio.
const UNKNOWN = ['unknown', 502, 'provider_outcome_unknown'];

function refusal(error) {
  const text = typeof error === 'string' ? error : String((error && error.message) || '');
  const known = REFUSALS.find(([start]) => text.startsWith(start));
  const [settle, status, reason] = known ? known.slice(1) : UNKNOWN;
  return {
    settle,
    status,
    // With a 429 the dispatcher waits this long and halves its send rate.
    retry_after: status === 429 ? '60' : '',
    answer: { error: reason },
    idempotency_key: $('Verify signature').first().json.idempotency_key,
  };
}

return $input.all().map((item) => ({ json: refusal(item.json.error) }));
