# The image the Helm chart runs (helm/outbox-relay, image.repository).
#   docker build -t ghcr.io/outbox-relay/outbox-relay:0.1.0 .
#   docker run --rm -e OUTBOX_RELAY_DATABASE_URL=postgres://... -p 9465:9465 ghcr.io/outbox-relay/outbox-relay:0.1.0

FROM golang:1.26 AS build
WORKDIR /src
# Dependencies first, so a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# Static (no cgo): the runtime image has no libc.
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/outbox-relay ./cmd/outbox-relay

# Distroless static: CA certificates (HTTPS receivers), tzdata, /etc/passwd
# with the nonroot user, no shell. `run` writes no files, so the
# chart's read-only root filesystem holds.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/outbox-relay /outbox-relay
USER 65532:65532
# /healthz, /readyz and /metrics (--http-addr, OUTBOX_RELAY_HTTP_ADDR).
EXPOSE 9465
ENTRYPOINT ["/outbox-relay"]
CMD ["run"]
