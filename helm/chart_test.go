// Package helm_test renders the chart with helm and checks the manifests.
package helm_test

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

func helmBinary(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("helm"); err == nil {
		return p
	}
	if gopath, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		p := filepath.Join(strings.TrimSpace(string(gopath)), "bin", "helm")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("helm is not installed; .ci/run installs it with go install helm.sh/helm/v3/cmd/helm@v3.22.0")
	}
	t.Skip("helm not on PATH (go install helm.sh/helm/v3/cmd/helm@v3.22.0 to run this test)")
	return ""
}

type manifest = map[string]any

// render runs helm template and returns the documents by kind.
func render(t *testing.T, args ...string) map[string][]manifest {
	t.Helper()
	cmd := exec.Command(helmBinary(t), append([]string{"template", "rel", "outbox-relay"}, args...)...)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("helm template %v: %v\n%s", args, err, stderr.String())
	}
	docs := map[string][]manifest{}
	dec := yaml.NewDecoder(&out)
	for {
		var m manifest
		err := dec.Decode(&m)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("decode rendered yaml: %v", err)
		}
		if m != nil {
			kind, _ := m["kind"].(string)
			docs[kind] = append(docs[kind], m)
		}
	}
	return docs
}

// get walks a path of map keys and slice indexes.
func get(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(manifest)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			s, ok := v.([]any)
			if !ok || k >= len(s) {
				return nil
			}
			v = s[k]
		}
	}
	return v
}

func container(t *testing.T, pod any, name string) map[string]any {
	t.Helper()
	cs, _ := get(pod, "containers").([]any)
	for _, c := range cs {
		if m, ok := c.(map[string]any); ok && m["name"] == name {
			return m
		}
	}
	t.Fatalf("no container %q in %v", name, pod)
	return nil
}

func checkRelayContainer(t *testing.T, c map[string]any) {
	t.Helper()
	if img, _ := c["image"].(string); img != "ghcr.io/outbox-relay/outbox-relay:0.1.0" {
		t.Errorf("image %q", img)
	}
	foundURL := false
	for _, e := range c["env"].([]any) {
		env := e.(map[string]any)
		if env["name"] == "OUTBOX_RELAY_DATABASE_URL" {
			foundURL = true
			if get(env, "valueFrom", "secretKeyRef", "name") != "outbox-relay-db" || get(env, "valueFrom", "secretKeyRef", "key") != "url" {
				t.Errorf("database URL not from the Secret: %v", env)
			}
		}
		if env["name"] == "OUTBOX_RELAY_HTTP_ADDR" && env["value"] != ":9465" {
			t.Errorf("http addr %v", env["value"])
		}
	}
	if !foundURL {
		t.Error("no OUTBOX_RELAY_DATABASE_URL")
	}
	if get(c, "ports", 0, "containerPort") != 9465 || get(c, "ports", 0, "name") != "metrics" {
		t.Errorf("ports %v", c["ports"])
	}
	if get(c, "livenessProbe", "httpGet", "path") != "/healthz" || get(c, "livenessProbe", "httpGet", "port") != "metrics" {
		t.Errorf("liveness probe %v", c["livenessProbe"])
	}
	if get(c, "readinessProbe", "httpGet", "path") != "/readyz" || get(c, "readinessProbe", "httpGet", "port") != "metrics" {
		t.Errorf("readiness probe %v", c["readinessProbe"])
	}
	if get(c, "securityContext", "runAsNonRoot") != true || get(c, "securityContext", "readOnlyRootFilesystem") != true {
		t.Errorf("securityContext %v", c["securityContext"])
	}
	if get(c, "args", 0) != "run" {
		t.Errorf("args %v", c["args"])
	}
}

func TestStandalone(t *testing.T) {
	docs := render(t, "--set", "mode=standalone")
	if len(docs["Deployment"]) != 1 || len(docs["Service"]) != 1 {
		t.Fatalf("rendered %d Deployments and %d Services", len(docs["Deployment"]), len(docs["Service"]))
	}
	if len(docs["ServiceMonitor"]) != 0 {
		t.Error("ServiceMonitor rendered while disabled")
	}
	d := docs["Deployment"][0]
	if get(d, "spec", "replicas") != 2 {
		t.Errorf("replicas %v, want 2 (one active, one standby)", get(d, "spec", "replicas"))
	}
	pod := get(d, "spec", "template", "spec")
	checkRelayContainer(t, container(t, pod, "outbox-relay"))
	if get(pod, "initContainers", 0, "args", 0) != "migrate" {
		t.Errorf("no migrate init container: %v", get(pod, "initContainers"))
	}
	if get(docs["Service"][0], "spec", "ports", 0, "port") != 9465 {
		t.Errorf("service port %v", get(docs["Service"][0], "spec", "ports"))
	}
}

func TestServiceMonitor(t *testing.T) {
	docs := render(t, "--set", "mode=standalone", "--set", "serviceMonitor.enabled=true")
	if len(docs["ServiceMonitor"]) != 1 {
		t.Fatal("no ServiceMonitor")
	}
	if get(docs["ServiceMonitor"][0], "spec", "endpoints", 0, "port") != "metrics" || get(docs["ServiceMonitor"][0], "spec", "endpoints", 0, "path") != "/metrics" {
		t.Errorf("ServiceMonitor endpoints %v", get(docs["ServiceMonitor"][0], "spec", "endpoints"))
	}
}

func TestSidecar(t *testing.T) {
	if docs := render(t); len(docs["Deployment"]) != 0 {
		t.Error("sidecar mode rendered a Deployment by itself")
	}
	docs := render(t, "--set", "example.enabled=true")
	if len(docs["Deployment"]) != 1 {
		t.Fatal("the sidecar example did not render")
	}
	pod := get(docs["Deployment"][0], "spec", "template", "spec")
	container(t, pod, "app")
	checkRelayContainer(t, container(t, pod, "outbox-relay"))
}
