#!/bin/sh
# Rewrites deploy/nats/dispatch.conf (on stdin) for another subject prefix
# (on stdout), the way the node derives every name from its --prefix:
#
#   deploy/nats/adapt-prefix.sh acme.jobs < deploy/nats/dispatch.conf > acme.conf
#
#   subjects   "dispatch.…"        -> "acme.jobs.…"
#   streams    DISPATCH_TASKS/DEAD/ERRORS -> ACME_JOBS_TASKS/DEAD/ERRORS
#   buckets    dispatch_tasks      -> acme_jobs_tasks (and _cancels)
#
# What stays: the account names, the micro service's name `dispatch` in
# `$SRV.….dispatch` (it does not follow the prefix), and the clients'
# JetStream API prefix JS.dispatch.API (a name of its own; change it on both
# sides if you like). The nats-server tests run this very script.
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 <prefix> < dispatch.conf > adapted.conf" >&2
    exit 2
fi
prefix=$1
# The node accepts dot-separated tokens of A-Z, a-z, 0-9, `_` and `-`.
if ! printf '%s\n' "$prefix" | grep -Eq '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$'; then
    echo "$0: invalid prefix '$prefix': use dot-separated tokens of A-Z, a-z, 0-9, _ or -" >&2
    exit 2
fi
# Names use the prefix with `.` and `-` turned into `_`.
token=$(printf '%s' "$prefix" | tr '.-' '__')
upper=$(printf '%s' "$token" | tr '[:lower:]' '[:upper:]')

sed -e "s/\"dispatch\\./\"$prefix./g" \
    -e "s/DISPATCH_TASKS/${upper}_TASKS/g" \
    -e "s/DISPATCH_DEAD/${upper}_DEAD/g" \
    -e "s/DISPATCH_ERRORS/${upper}_ERRORS/g" \
    -e "s/dispatch_tasks/${token}_tasks/g" \
    -e "s/dispatch_cancels/${token}_cancels/g"
