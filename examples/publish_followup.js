// Publish one `followup.requested`, as a service that wants an SMS sent would.
//
//   npm install amqplib
//   RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/ node examples/publish_followup.js 42
//
// Prints the idempotency key it used. Publishing the same key again never creates a second
// follow-up, so a publisher that is unsure whether its publish went through sends it again.
'use strict';

const crypto = require('node:crypto');
const amqp = require('amqplib');

const EXCHANGE = 'followups';

function requestBody(contractorId, idempotencyKey) {
  const due = new Date(Date.now() + 10 * 60 * 1000);
  return {
    idempotency_key: idempotencyKey,
    contractor_id: contractorId,
    scheduled_time: due.toISOString(), // RFC 3339 with an offset: "Z"
    followup_type: 'check_in',
    message_template: 'Hi {first_name}, checking in on your plans at {company_name}.',
    message_tone: 'friendly',
    action_item_id: null,
    event_id: null,
    ai_should_personalize: false,
    ai_context_hints: {},
    skip_if_completed: false,
    is_recurring: false,
    recurrence_interval_days: null,
    priority: 0,
    requested_by: 'example-publisher',
  };
}

async function publish(url, contractorId) {
  const key = `example-${crypto.randomUUID()}`;
  const connection = await amqp.connect(url);
  try {
    // A confirm channel: waitForConfirms resolves once the broker has the message on disk.
    const channel = await connection.createConfirmChannel();
    let returned = null;
    // mandatory: a message that no queue is bound for comes back here (before its confirm).
    channel.on('return', (message) => {
      returned = message.fields.replyText;
    });
    await channel.assertExchange(EXCHANGE, 'topic', { durable: true });
    channel.publish(
      EXCHANGE,
      'followup.requested',
      Buffer.from(JSON.stringify(requestBody(contractorId, key))),
      {
        contentType: 'application/json',
        persistent: true,
        messageId: key,
        mandatory: true,
      },
    );
    await channel.waitForConfirms();
    if (returned !== null) {
      throw new Error(`the broker routed the message nowhere: ${returned}`);
    }
    await channel.close();
  } finally {
    await connection.close();
  }
  return key;
}

const url = process.env.RABBITMQ_URL || 'amqp://guest:guest@127.0.0.1:5672/';
const contractorId = Number.parseInt(process.argv[2] || '1', 10);
publish(url, contractorId).then(
  (key) => console.log(key),
  (error) => {
    console.error(error.message);
    process.exit(1);
  },
);
