// Code node "Route claim". "Claim Idempotency-Key" inserted the key, or found it, in one
// statement on a primary key, so of any number of calls with one key (retries, or duplicates
// arriving at the same moment on several n8n workers) exactly one reads "claimed" and sends.
// The others are answered from what the first one did, and never send.
const BUSY_RETRY_AFTER_SECONDS = 30;

function callbackUrl(base, key) {
  if (!base || !/^https?:\/\/[^?#]+$/.test(base)) {
    throw new Error(
      'FOLLOWUPS_STATUS_CALLBACK_URL must be the production URL of the "Twilio status callback" webhook, without a query',
    );
  }
  return `${base}?key=${key}`;
}

function route(claim, sms, callbackBase) {
  switch (claim) {
    case 'claimed':
      return {
        action: 'send',
        idempotency_key: sms.idempotency_key,
        phone: sms.phone,
        message: sms.message,
        status_callback: callbackUrl(callbackBase, sms.idempotency_key),
      };
    case 'sent':
      // A retry of a call whose SMS went out (its answer was lost, or came too late).
      return { action: 'answer', status: 200, answer: { outcome: 'duplicate' } };
    case 'unknown':
      // An earlier call reached Twilio and got no answer: the SMS may have gone. Sending again
      // could send it twice, so this key is refused for good (the dispatcher records `failed`,
      // reason http_409); Twilio's message log tells whether it went.
      return { action: 'answer', status: 409, answer: { error: 'outcome_unknown' } };
    default:
      // "sending" (the first call is still at Twilio) or "contended" (it committed its claim
      // while this statement ran): ask the dispatcher to come back once the first one is done.
      return {
        action: 'answer',
        status: 503,
        retry_after: String(BUSY_RETRY_AFTER_SECONDS),
        answer: { error: 'in_flight' },
      };
  }
}

const sms = $('Verify signature').first().json;
return $input.all().map((item) => ({
  json: route(item.json.claim, sms, $env.FOLLOWUPS_STATUS_CALLBACK_URL),
}));
