# Build: docker build -t outbox-relay .
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/outbox-relay ./cmd/outbox-relay

# Static binary on a distroless base; runs as the non-root user 65532.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/outbox-relay /outbox-relay
USER 65532:65532
EXPOSE 9465
ENTRYPOINT ["/outbox-relay"]
CMD ["run"]
