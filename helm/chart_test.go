// Package helm_test renders the chart (and the example application chart
// that includes it) with the helm binary and checks the manifests.
package helm_test

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

const (
	image     = "ghcr.io/outbox-relay/outbox-relay:0.1.0" // repository:appVersion
	httpPort  = 9465
	probePort = "metrics"
)

// helmBinary finds helm on PATH or where go install puts it. CI must run
// this test, so there a missing helm fails it; elsewhere it skips.
func helmBinary(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("helm"); err == nil {
		return p
	}
	for _, env := range []string{"GOBIN", "GOPATH"} {
		out, err := exec.Command("go", "env", env).Output()
		dir := strings.TrimSpace(string(out))
		if err != nil || dir == "" {
			continue
		}
		if env == "GOPATH" {
			dir = filepath.Join(filepath.SplitList(dir)[0], "bin")
		}
		if p := filepath.Join(dir, "helm"); isExecutable(p) {
			return p
		}
	}
	const install = "go install helm.sh/helm/v3/cmd/helm@v3.22.0"
	if os.Getenv("CI") == "true" {
		t.Fatalf("helm is not on PATH, in GOBIN or in GOPATH/bin; CI must run this test (.ci/run installs it: %s)", install)
	}
	t.Skipf("helm is not on PATH, in GOBIN or in GOPATH/bin; install it to run this test: %s", install)
	return ""
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// helm runs helm with its cache, config and data in a temporary directory.
func helm(t *testing.T, args ...string) (stdout []byte, err error) {
	t.Helper()
	home := t.TempDir()
	cmd := exec.Command(helmBinary(t), args...)
	cmd.Env = append(os.Environ(),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"))
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return nil, errors.New(err.Error() + ": " + stderr.String())
	}
	return out.Bytes(), nil
}

type manifest = map[string]any

// render runs helm template on chart and returns the documents by kind.
func render(t *testing.T, chart string, args ...string) map[string][]manifest {
	t.Helper()
	out, err := helm(t, append([]string{"template", "rel", chart}, args...)...)
	if err != nil {
		t.Fatalf("helm template %s %v: %v", chart, args, err)
	}
	docs := map[string][]manifest{}
	dec := yaml.NewDecoder(bytes.NewReader(out))
	for {
		var m manifest
		err := dec.Decode(&m)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("decode the output of helm template %v: %v\n%s", args, err, out)
		}
		if m != nil {
			kind, _ := m["kind"].(string)
			docs[kind] = append(docs[kind], m)
		}
	}
	return docs
}

// get walks a path of map keys and slice indexes; nil when it is not there.
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

func named(list any, name string) manifest {
	s, _ := list.([]any)
	for _, item := range s {
		if m, ok := item.(manifest); ok && m["name"] == name {
			return m
		}
	}
	return nil
}

func container(t *testing.T, pod any, name string) manifest {
	t.Helper()
	c := named(get(pod, "containers"), name)
	if c == nil {
		t.Fatalf("no container %q in the pod: %v", name, get(pod, "containers"))
	}
	return c
}

// envValue returns the env entry's value and whether it is there.
func envValue(c manifest, name string) (any, bool) {
	e := named(c["env"], name)
	if e == nil {
		return nil, false
	}
	return e["value"], true
}

func only(t *testing.T, docs map[string][]manifest, kind string) manifest {
	t.Helper()
	if len(docs[kind]) != 1 {
		t.Fatalf("rendered %d %s, want 1", len(docs[kind]), kind)
	}
	return docs[kind][0]
}

func checkDatabaseURL(t *testing.T, c manifest, secret string) {
	t.Helper()
	e := named(c["env"], "OUTBOX_RELAY_DATABASE_URL")
	if e == nil {
		t.Fatalf("container %v has no OUTBOX_RELAY_DATABASE_URL", c["name"])
	}
	if _, inline := e["value"]; inline {
		t.Errorf("OUTBOX_RELAY_DATABASE_URL is inlined: %v", e)
	}
	if get(e, "valueFrom", "secretKeyRef", "name") != secret || get(e, "valueFrom", "secretKeyRef", "key") != "url" {
		t.Errorf("OUTBOX_RELAY_DATABASE_URL is not from Secret %s key url: %v", secret, e)
	}
}

func checkSecurityContext(t *testing.T, c manifest) {
	t.Helper()
	sc := c["securityContext"]
	if get(sc, "runAsNonRoot") != true || get(sc, "readOnlyRootFilesystem") != true || get(sc, "allowPrivilegeEscalation") != false {
		t.Errorf("container %v securityContext: %v", c["name"], sc)
	}
	if uid, _ := get(sc, "runAsUser").(int); uid == 0 {
		t.Errorf("container %v runs as uid %v", c["name"], get(sc, "runAsUser"))
	}
	if drop, _ := get(sc, "capabilities", "drop").([]any); !slices.Contains(drop, any("ALL")) {
		t.Errorf("container %v does not drop ALL capabilities: %v", c["name"], get(sc, "capabilities"))
	}
}

// checkRelay checks the relay container and its migrate init container.
func checkRelay(t *testing.T, pod any, secret string) {
	t.Helper()
	c := container(t, pod, "outbox-relay")
	if c["image"] != image {
		t.Errorf("image %v, want %s", c["image"], image)
	}
	if get(c, "args", 0) != "run" {
		t.Errorf("args %v, want [run]", c["args"])
	}
	checkDatabaseURL(t, c, secret)
	if v, _ := envValue(c, "OUTBOX_RELAY_HTTP_ADDR"); v != ":9465" {
		t.Errorf("OUTBOX_RELAY_HTTP_ADDR %v, want :9465", v)
	}
	if p := named(c["ports"], "metrics"); p == nil || p["containerPort"] != httpPort {
		t.Errorf("ports %v, want metrics on %d", c["ports"], httpPort)
	}
	for probe, path := range map[string]string{"livenessProbe": "/healthz", "readinessProbe": "/readyz"} {
		if get(c, probe, "httpGet", "path") != path || get(c, probe, "httpGet", "port") != probePort {
			t.Errorf("%s %v, want GET %s on port %s", probe, c[probe], path, probePort)
		}
	}
	if get(c, "resources", "limits", "memory") != "256Mi" || get(c, "resources", "requests", "memory") != "64Mi" {
		t.Errorf("resources %v", c["resources"])
	}
	checkSecurityContext(t, c)

	m := named(get(pod, "initContainers"), "outbox-relay-migrate")
	if m == nil {
		t.Fatalf("no migrate init container: %v", get(pod, "initContainers"))
	}
	if m["image"] != image || get(m, "args", 0) != "migrate" {
		t.Errorf("migrate init container: image %v, args %v", m["image"], m["args"])
	}
	checkDatabaseURL(t, m, secret)
	checkSecurityContext(t, m)
}

func TestSidecarModeRendersNoWorkload(t *testing.T) {
	t.Parallel()
	docs := render(t, "outbox-relay")
	for kind := range docs {
		t.Errorf("sidecar mode rendered a %s by itself", kind)
	}
}

func TestStandalone(t *testing.T) {
	t.Parallel()
	docs := render(t, "outbox-relay", "--set", "mode=standalone", "--set", "podAnnotations.team=payments")
	if len(docs["ServiceMonitor"]) != 0 {
		t.Error("ServiceMonitor rendered while serviceMonitor.enabled is false")
	}
	d := only(t, docs, "Deployment")
	if get(d, "spec", "replicas") != 2 {
		t.Errorf("replicas %v, want 2 (one streams, one stands by)", get(d, "spec", "replicas"))
	}
	if get(d, "spec", "template", "metadata", "annotations", "team") != "payments" {
		t.Errorf("podAnnotations not on the pod: %v", get(d, "spec", "template", "metadata"))
	}
	pod := get(d, "spec", "template", "spec")
	if get(pod, "terminationGracePeriodSeconds") != 30 {
		t.Errorf("terminationGracePeriodSeconds %v, want 30", get(pod, "terminationGracePeriodSeconds"))
	}
	if get(pod, "securityContext", "runAsNonRoot") != true {
		t.Errorf("pod securityContext %v", get(pod, "securityContext"))
	}
	checkRelay(t, pod, "outbox-relay-db")

	svc := only(t, docs, "Service")
	if p := named(get(svc, "spec", "ports"), "metrics"); p == nil || p["port"] != httpPort || p["targetPort"] != "metrics" {
		t.Errorf("Service ports %v, want metrics %d -> metrics", get(svc, "spec", "ports"), httpPort)
	}
	for k, v := range get(d, "spec", "selector", "matchLabels").(manifest) {
		if get(svc, "spec", "selector", k) != v {
			t.Errorf("Service selector %v does not select the Deployment's pods (%s=%v)", get(svc, "spec", "selector"), k, v)
		}
	}
}

func TestServiceMonitor(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		args []string
		want int
	}{
		{"standalone, default", []string{"--set", "mode=standalone"}, 0},
		{"standalone, enabled", []string{"--set", "mode=standalone", "--set", "serviceMonitor.enabled=true"}, 1},
		{"sidecar, default", nil, 0},
		{"sidecar, enabled with a pod selector", []string{"--set", "serviceMonitor.enabled=true", "--set", "metrics.podSelector.app=shop"}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			docs := render(t, "outbox-relay", tc.args...)
			if len(docs["ServiceMonitor"]) != tc.want {
				t.Fatalf("%d ServiceMonitors, want %d", len(docs["ServiceMonitor"]), tc.want)
			}
			if tc.want == 0 {
				return
			}
			sm := docs["ServiceMonitor"][0]
			if get(sm, "apiVersion") != "monitoring.coreos.com/v1" {
				t.Errorf("apiVersion %v", get(sm, "apiVersion"))
			}
			if get(sm, "spec", "endpoints", 0, "port") != "metrics" || get(sm, "spec", "endpoints", 0, "path") != "/metrics" {
				t.Errorf("endpoints %v, want port metrics, path /metrics", get(sm, "spec", "endpoints"))
			}
			svc := only(t, docs, "Service")
			for k, v := range get(sm, "spec", "selector", "matchLabels").(manifest) {
				if get(svc, "metadata", "labels", k) != v {
					t.Errorf("ServiceMonitor selects %s=%v; the metrics Service's labels are %v", k, v, get(svc, "metadata", "labels"))
				}
			}
		})
	}
}

func TestValues(t *testing.T) {
	t.Parallel()
	docs := render(t, "outbox-relay", "--set", "mode=standalone",
		"--set", "image.tag=1.2.3", "--set", "config.workers=16", "--set", "config.overflow=block",
		"--set", "config.allowNetworks=10.0.0.0/8", "--set", "migrate.enabled=false",
		"--set", "config.extraEnv[0].name=OUTBOX_RELAY_QUEUE_EVENTS", "--set-string", "config.extraEnv[0].value=5000")
	pod := get(only(t, docs, "Deployment"), "spec", "template", "spec")
	c := container(t, pod, "outbox-relay")
	if c["image"] != "ghcr.io/outbox-relay/outbox-relay:1.2.3" {
		t.Errorf("image %v", c["image"])
	}
	for name, want := range map[string]string{
		"OUTBOX_RELAY_WORKERS":        "16",
		"OUTBOX_RELAY_OVERFLOW":       "block",
		"OUTBOX_RELAY_ALLOW_NETWORKS": "10.0.0.0/8",
		"OUTBOX_RELAY_QUEUE_EVENTS":   "5000",
	} {
		if v, _ := envValue(c, name); v != want {
			t.Errorf("%s %v, want %s", name, v, want)
		}
	}
	if ic := get(pod, "initContainers"); ic != nil {
		t.Errorf("migrate.enabled=false still renders init containers: %v", ic)
	}
}

// config.memoryLimit becomes OUTBOX_RELAY_MEMORY_LIMIT in bytes, whether
// it comes from a values file (where YAML numbers reach the template as
// float64) or from --set.
func TestMemoryLimit(t *testing.T) {
	t.Parallel()
	file := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(file, []byte("config:\n  memoryLimit: 362387865\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"--values", file},
		{"--set", "config.memoryLimit=362387865"},
		{"--set-string", "config.memoryLimit=362387865"},
	} {
		pod := get(only(t, render(t, "outbox-relay", append([]string{"--set", "mode=standalone"}, args...)...), "Deployment"), "spec", "template", "spec")
		if v, _ := envValue(container(t, pod, "outbox-relay"), "OUTBOX_RELAY_MEMORY_LIMIT"); v != "362387865" {
			t.Errorf("%v: OUTBOX_RELAY_MEMORY_LIMIT %v, want 362387865", args, v)
		}
	}
	pod := get(only(t, render(t, "outbox-relay", "--set", "mode=standalone"), "Deployment"), "spec", "template", "spec")
	if v, ok := envValue(container(t, pod, "outbox-relay"), "OUTBOX_RELAY_MEMORY_LIMIT"); ok {
		t.Errorf("OUTBOX_RELAY_MEMORY_LIMIT=%v is set by default; the relay derives its limit then", v)
	}
}

func TestInvalidValuesAreRefused(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--set", "mode=daemonset"}, "mode must be sidecar or standalone"},
		{[]string{"--set", "mode=standalone", "--set", "config.overflow=drop"}, "config.overflow must be spill or block"},
		{[]string{"--set", "mode=standalone", "--set", "database.secretName="}, "database.secretName"},
		{[]string{"--set", "serviceMonitor.enabled=true"}, "needs metrics.podSelector"},
		{[]string{"--set", "mode=standalone", "--set", "config.memoryLimit=345MiB"}, "config.memoryLimit must be a number of bytes"},
	} {
		_, err := helm(t, append([]string{"template", "rel", "outbox-relay"}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("helm template %v: error %v, want one containing %q", tc.args, err, tc.want)
		}
	}
}

// TestExampleApp renders the example application chart the way a user's
// chart would be: helm dependency build packages this chart into its
// charts/, and its Deployment includes "outbox-relay.sidecar" and
// "outbox-relay.migrate" from its own root context.
func TestExampleApp(t *testing.T) {
	t.Parallel()
	// The example refers to the chart as file://../../outbox-relay: copy
	// both, keeping that layout, so the build does not write into the tree.
	root := t.TempDir()
	for _, dir := range []string{"outbox-relay", filepath.Join("examples", "app")} {
		copyDir(t, dir, filepath.Join(root, dir))
	}
	app := filepath.Join(root, "examples", "app")
	if _, err := helm(t, "dependency", "build", app); err != nil {
		t.Fatalf("helm dependency build: %v", err)
	}
	docs := render(t, app)
	d := only(t, docs, "Deployment")
	pod := get(d, "spec", "template", "spec")
	container(t, pod, "app")
	checkRelay(t, pod, "app-db")
	c := container(t, pod, "outbox-relay")
	if v, _ := envValue(c, "OUTBOX_RELAY_PRESET"); v != "small" {
		t.Errorf("OUTBOX_RELAY_PRESET %v, want the example's small", v)
	}
	if v, ok := envValue(c, "OUTBOX_RELAY_WORKERS"); ok {
		t.Errorf("OUTBOX_RELAY_WORKERS=%v is set, and the variable would override the preset", v)
	}
	svc := only(t, docs, "Service")
	for k, v := range get(svc, "spec", "selector").(manifest) {
		if get(d, "spec", "template", "metadata", "labels", k) != v {
			t.Errorf("metrics Service selector %v does not select the application's pods", get(svc, "spec", "selector"))
		}
	}
}

func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		if d.IsDir() {
			if d.Name() == "charts" { // a local helm dependency build's output
				return filepath.SkipDir
			}
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		if d.Name() == "Chart.lock" {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), data, 0o644)
	})
	if err != nil {
		t.Fatalf("copy %s: %v", src, err)
	}
}
