#!/usr/bin/env bash
# Install the flowlog recipes into Elasticsearch: ILM policy, ingest pipeline, index template
# (data stream "flowlog"). Idempotent: each PUT replaces the previous version.
#
#   ES_URL=https://elasticsearch.logging.svc:9200 ES_AUTH=elastic:secret RETENTION_DAYS=365 \
#       bash config/elasticsearch/install.sh
#
# ES_URL          Elasticsearch base URL (default http://localhost:9200)
# ES_AUTH         user:password for basic auth (optional)
# ES_CACERT       CA file to verify the server (optional)
# RETENTION_DAYS  days a record is kept after its backing index rolled over (default 90)
set -euo pipefail
cd "$(dirname "$0")"
ES_URL="${ES_URL:-http://localhost:9200}"
RETENTION_DAYS="${RETENTION_DAYS:-90}"
if ! [[ "$RETENTION_DAYS" =~ ^[1-9][0-9]*$ ]]; then
    echo "install.sh: RETENTION_DAYS must be a positive whole number of days, got '$RETENTION_DAYS'" >&2
    exit 2
fi
curl_args=(--silent --show-error --fail-with-body -H 'Content-Type: application/json')
[[ -n "${ES_AUTH:-}" ]] && curl_args+=(-u "$ES_AUTH")
[[ -n "${ES_CACERT:-}" ]] && curl_args+=(--cacert "$ES_CACERT")

put() {  # put PATH FILE|-
    echo "PUT $1" >&2
    curl "${curl_args[@]}" -X PUT "$ES_URL$1" --data-binary "@$2"
    echo >&2
}

sed "s/\"min_age\": \"90d\"/\"min_age\": \"${RETENTION_DAYS}d\"/" ilm-policy.json \
    | put /_ilm/policy/flowlog -
put /_ingest/pipeline/flowlog-dedup ingest-pipeline.json
put /_index_template/flowlog index-template.json
