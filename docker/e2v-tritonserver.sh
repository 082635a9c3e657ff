#!/bin/sh
# e2v-tritonserver [tritonserver flags...]: how the server image starts Triton (compose,
# Kubernetes). Installed as /usr/local/bin/e2v-tritonserver by docker/server.Dockerfile.
#
# 1. Removes Python-backend shared-memory regions left by an earlier run of this container
#    (Kubernetes keeps a pod's /dev/shm emptyDir across container restarts); a region some
#    process still has open or mapped is left alone.
# 2. Reads the admin key from $E2V_ADMIN_KEY_FILE (default: the compose / Kubernetes secret
#    at /run/secrets/e2v-admin-key) and execs tritonserver with the admin APIs behind it:
#    --http-restricted-api / --grpc-restricted-protocol, e2v.contract.restricted_api_flags.
#    No key file: refuses to start (exit 2) rather than serve open admin APIs.
set -eu

key_file="${E2V_ADMIN_KEY_FILE:-/run/secrets/e2v-admin-key}"
restricted="logging,trace,shared-memory,model-repository:triton-admin-key"

for region in /dev/shm/triton_python_backend_shm_region_*; do
    [ -f "$region" ] || continue
    if ls -l /proc/[0-9]*/fd 2>/dev/null | grep -qF -- "$region"; then continue; fi
    if grep -qsF -- "$region" /proc/[0-9]*/maps; then continue; fi
    rm -f -- "$region" && echo "e2v-tritonserver: removed stale $region" >&2
done

if [ ! -r "$key_file" ]; then
    echo "e2v-tritonserver: admin key file $key_file is missing or unreadable" \
        "(mount the e2v-admin-key secret, see docs/deploy.md)" >&2
    exit 2
fi
key=$(tr -d ' \t\r\n' < "$key_file")
case "$key" in
    *[!A-Za-z0-9._~+/-]*)
        echo "e2v-tritonserver: admin key must be letters, digits and - _ . ~ + /" >&2
        exit 2 ;;
esac
if [ "${#key}" -lt 16 ]; then
    echo "e2v-tritonserver: admin key must be at least 16 characters (openssl rand -hex 32)" >&2
    exit 2
fi

exec tritonserver "$@" \
    "--http-restricted-api=$restricted=$key" \
    "--grpc-restricted-protocol=$restricted=$key"
