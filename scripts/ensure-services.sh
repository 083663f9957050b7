#!/usr/bin/env bash
# Start the local PostgreSQL and RabbitMQ if they are down, and wait until both answer; enable
# RabbitMQ's management API if it is off.
# Install libfaketime if it is missing: the clock-skew e2e test runs the services under it.
set -euo pipefail

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
rabbit_up() { timeout 5 bash -c '</dev/tcp/127.0.0.1/5672' 2>/dev/null; }
faketime_present() { compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null; }
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }

if ! faketime_present; then
    echo "libfaketime is missing: installing faketime"
    # The package lists may be old or absent on a fresh machine: refresh them only if needed.
    apt_install faketime || { apt-get update -q >/dev/null && apt_install faketime; }
fi

if ! pg_up; then
    echo "PostgreSQL is down: starting it"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
if ! rabbit_up; then
    echo "RabbitMQ is down: starting it"
    rabbitmq-server -detached
fi
for _ in $(seq 1 90); do
    if pg_up && rabbit_up; then
        break
    fi
    sleep 1
done
if ! pg_up || ! rabbit_up; then
    echo "PostgreSQL or RabbitMQ did not come up within 90 s: check 'pg_lsclusters' and 'rabbitmqctl status'" >&2
    exit 1
fi
# `followups declare` applies the queue policies through the management API.
if ! timeout 5 bash -c '</dev/tcp/127.0.0.1/15672' 2>/dev/null; then
    echo "RabbitMQ's management API is off: enabling it"
    rabbitmq-plugins --quiet enable rabbitmq_management >/dev/null
    for _ in $(seq 1 30); do
        timeout 5 bash -c '</dev/tcp/127.0.0.1/15672' 2>/dev/null && exit 0
        sleep 1
    done
    echo "the management API did not come up on 127.0.0.1:15672: check 'rabbitmq-plugins list'" >&2
    exit 1
fi
