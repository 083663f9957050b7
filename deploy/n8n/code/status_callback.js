// Code node "Verify Twilio signature": Twilio's status callback, a form POST to the
// StatusCallback URL "Route claim" gave the message (it carries the send key as ?key=).
// X-Twilio-Signature is base64 HMAC-SHA1, keyed with the account's Auth Token, over that URL
// followed by every form field's name and value, sorted by name. A verified final status becomes
// a followup.delivery_reported command (the project README, Delivery reports).
const crypto = require('crypto');

// Twilio's MessageStatus -> the project's delivery status. Any other status (queued, sending,
// sent, accepted, scheduled) is a step on the way and reports nothing.
const FINAL = {
  delivered: 'delivered',
  read: 'delivered', // WhatsApp: read implies delivered
  undelivered: 'undelivered',
  partially_delivered: 'undelivered', // part of a multi-part message is missing
  failed: 'failed',
  canceled: 'failed', // never left Twilio
};
const KEY = /^[A-Za-z0-9._-]{1,200}$/;

function twilioSignature(token, url, form) {
  const signed = Object.keys(form)
    .sort()
    .reduce((text, name) => text + name + form[name], url);
  return crypto.createHmac('sha1', token).update(Buffer.from(signed, 'utf8')).digest();
}

function fromTwilio(tokens, url, form, header) {
  const offered = Buffer.from(header || '', 'base64');
  return tokens.some((token) => {
    const expected = twilioSignature(token, url, form);
    return offered.length === expected.length && crypto.timingSafeEqual(offered, expected);
  });
}

function authTokens(setting) {
  const tokens = (setting || '').split(/\s+/).filter(Boolean);
  if (!tokens.length) {
    throw new Error('FOLLOWUPS_TWILIO_AUTH_TOKEN is unset: set the Auth Token Twilio signs callbacks with');
  }
  return tokens;
}

function callback(headers, query, form, tokens, base, now) {
  const key = query.key;
  if (typeof key !== 'string' || !KEY.test(key)) {
    return { action: 'refuse', status: 403 };
  }
  if (!fromTwilio(tokens, `${base}?key=${key}`, form, headers['x-twilio-signature'])) {
    return { action: 'refuse', status: 403 };
  }
  const status = FINAL[form.MessageStatus];
  if (!status) {
    return { action: 'ignore', status: 204 };
  }
  const report = {
    idempotency_key: key,
    status,
    provider: 'twilio',
    // Twilio's callback carries no time of its own; the time it arrived orders the reports.
    reported_at: now.toISOString(),
  };
  if (form.ErrorCode) {
    report.error_code = String(form.ErrorCode);
  }
  return { action: 'publish', status: 204, message_sid: form.MessageSid || null, report };
}

const tokens = authTokens($env.FOLLOWUPS_TWILIO_AUTH_TOKEN);
const base = $env.FOLLOWUPS_STATUS_CALLBACK_URL;
if (!base) {
  throw new Error('FOLLOWUPS_STATUS_CALLBACK_URL is unset');
}
return $input.all().map((item) => ({
  json: callback(item.json.headers, item.json.query || {}, item.json.body || {}, tokens, base, new Date()),
}));
