// Code node "Verify signature". The dispatcher signs every call as Standard Webhooks describe
// (the project README, Signing): HMAC-SHA256 over "{webhook-id}.{webhook-timestamp}.{raw body}"
// with the base64 key after "whsec_". The raw body is verified, never the parsed JSON written out
// again: the dispatcher's escapes and number formats would not survive a round trip.
// FOLLOWUPS_WEBHOOK_SECRET may hold several secrets separated by spaces, so a rotation can accept
// the old and the new one for a while.
const crypto = require('crypto');

// As the Standard Webhooks libraries: a signature older or newer than this is a replay.
const TOLERANCE_SECONDS = 5 * 60;
// The send key is a UUID; this also keeps it safe in a URL query and in a list of SQL parameters.
const KEY = /^[A-Za-z0-9._-]{1,200}$/;
const E164 = /^\+[1-9]\d{6,14}$/;
const MAX_SMS_CHARACTERS = 1600;

function refuse(status, reason) {
  return { accepted: false, status, answer: { error: reason } };
}

function signingKeys(setting) {
  const secrets = (setting || '').split(/\s+/).filter(Boolean);
  if (!secrets.length) {
    throw new Error('FOLLOWUPS_WEBHOOK_SECRET is unset: set the secret the dispatcher signs with');
  }
  return secrets.map((secret) => {
    if (!secret.startsWith('whsec_')) {
      throw new Error('FOLLOWUPS_WEBHOOK_SECRET: every secret starts with whsec_');
    }
    return Buffer.from(secret.slice('whsec_'.length), 'base64');
  });
}

function signedBy(keys, id, timestamp, body, header) {
  const content = Buffer.concat([Buffer.from(`${id}.${timestamp}.`), body]);
  const offered = header
    .split(' ')
    .filter((part) => part.startsWith('v1,'))
    .map((part) => Buffer.from(part.slice(3), 'base64'));
  return keys.some((key) => {
    const expected = crypto.createHmac('sha256', key).update(content).digest();
    return offered.some((s) => s.length === expected.length && crypto.timingSafeEqual(s, expected));
  });
}

function verify(headers, body, keys, nowSeconds) {
  const id = headers['webhook-id'];
  const timestamp = headers['webhook-timestamp'];
  const signature = headers['webhook-signature'];
  if (!id || !timestamp || !signature) {
    return refuse(401, 'unsigned: webhook-id, webhook-timestamp and webhook-signature are required');
  }
  if (!/^\d{1,12}$/.test(timestamp) || Math.abs(nowSeconds - Number(timestamp)) > TOLERANCE_SECONDS) {
    return refuse(401, 'stale_timestamp: signed more than five minutes from now');
  }
  if (!signedBy(keys, id, timestamp, body, signature)) {
    return refuse(401, 'bad_signature');
  }
  // The Idempotency-Key header is not signed; webhook-id is, and the dispatcher sends the same
  // value in both, so requiring them equal makes the dedupe key a signed one.
  const key = headers['idempotency-key'];
  if (key !== id || !KEY.test(key)) {
    return refuse(400, 'idempotency_key: the Idempotency-Key header must equal webhook-id');
  }
  let sms;
  try {
    sms = JSON.parse(body.toString('utf8'));
  } catch {
    return refuse(400, 'malformed_json');
  }
  if (typeof sms !== 'object' || sms === null || typeof sms.phone !== 'string' || !E164.test(sms.phone)) {
    return refuse(422, 'phone: E.164 required');
  }
  if (typeof sms.message !== 'string' || !sms.message || sms.message.length > MAX_SMS_CHARACTERS) {
    return refuse(422, `message: 1 to ${MAX_SMS_CHARACTERS} characters`);
  }
  return {
    accepted: true,
    idempotency_key: key,
    followup_id: Number.isSafeInteger(sms.followup_id) ? sms.followup_id : null,
    phone: sms.phone,
    message: sms.message,
  };
}

const keys = signingKeys($env.FOLLOWUPS_WEBHOOK_SECRET);
const now = Math.floor(Date.now() / 1000);
const verdicts = [];
for (const [index, item] of $input.all().entries()) {
  // The Webhook node's "Raw Body" option keeps the bytes as received, in binary property "data".
  const body = item.binary && item.binary.data
    ? await this.helpers.getBinaryDataBuffer(index, 'data')
    : Buffer.alloc(0);
  verdicts.push({ json: verify(item.json.headers, body, keys, now) });
}
return verdicts;
