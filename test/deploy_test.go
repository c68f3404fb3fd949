package test

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

var metricRef = regexp.MustCompile(`\bredis_[a-z0-9_]+`)

// exportedNames scrapes a running agent that has an instance (with TLS)
// which crashed once (so every series exists) and returns the sample
// names.
func exportedNames(t *testing.T) map[string]bool {
	t.Helper()
	testenv.RedisServer(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	// A backup target, and a backup taken: the backup series exist.
	flags, env := backupOpts(testenv.StartS3(t), "dash-vm", "--backup-schedule", "24h")
	a := runAgent(t, agentOpts{dataDir: dataDir, env: env, extra: append([]string{"--health-interval", "20ms"}, flags...)})
	// With TLS, for the certificate's expiry.
	var in instance
	if code := a.do("PUT", "/v1/instances/dash", `{"memory_mb":32,"persistence":"aof-always","tls":"optional"}`, &in); code != 201 {
		t.Fatalf("provision dash = %d", code)
	}
	syscall.Kill(in.PID, syscall.SIGKILL)
	names := map[string]bool{}
	deadline := time.Now().Add(10 * time.Second)
	backedUp := false
	for !names["redis_agent_instance_restarts_total"] || !names["redis_up"] || !names["redis_db_keys"] || !names["redis_agent_backup_last_success_bytes"] ||
		!names["redis_agent_instance_tls_cert_expiry_timestamp_seconds"] {
		if !backedUp && names["redis_up"] {
			var inst instance
			if a.do("GET", "/v1/instances/dash", "", &inst); inst.State == "running" {
				a.backupNow("dash")
				backedUp = true
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("series never appeared; have %v", names)
		}
		mustBind(t, a, "dash", "b"+strings.ReplaceAll(time.Now().Format("150405.000000"), ".", ""))
		resp, err := http.Get(a.base + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, line := range strings.Split(string(body), "\n") {
			if line == "" || line[0] == '#' {
				continue
			}
			name := line[:strings.IndexAny(line, "{ ")]
			names[name] = true
		}
		// redis_db_keys needs a key.
		var c credentials
		a.do("PUT", "/v1/instances/dash/bindings/writer", "", &c)
		redisClient(t, c).Set(t.Context(), "k", "v", 0)
		time.Sleep(30 * time.Millisecond)
	}
	a.do("DELETE", "/v1/instances/dash", "", nil)
	return names
}

func checkRefs(t *testing.T, where string, exprs []string, names map[string]bool) {
	t.Helper()
	if len(exprs) == 0 {
		t.Fatalf("%s: no expressions found", where)
	}
	for _, e := range exprs {
		for _, ref := range metricRef.FindAllString(e, -1) {
			if strings.HasPrefix(ref, "redis_broker_") {
				continue // the broker's: broker.TestAlertRulesNameExportedMetrics checks them
			}
			if !names[ref] {
				t.Errorf("%s references %s, which the agent does not export (expr %q)", where, ref, e)
			}
		}
	}
}

// The alert rules and the dashboard parse, and every metric they name is
// one the agent exports.
func TestDeployRulesAndDashboard(t *testing.T) {
	names := exportedNames(t)

	var rules struct {
		Groups []struct {
			Name  string
			Rules []struct {
				Alert       string
				Expr        string
				For         string
				Labels      map[string]string
				Annotations map[string]string
			}
		}
	}
	b, err := os.ReadFile("../deploy/prometheus-rules.yml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &rules); err != nil {
		t.Fatalf("prometheus-rules.yml: %v", err)
	}
	var exprs, alerts []string
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" || strings.TrimSpace(r.Expr) == "" || r.Labels["severity"] == "" || r.Annotations["summary"] == "" {
				t.Errorf("rule %+v lacks alert, expr, severity or summary", r)
			}
			if r.For != "" {
				if _, err := time.ParseDuration(r.For); err != nil {
					t.Errorf("rule %s: for %q: %v", r.Alert, r.For, err)
				}
			}
			exprs = append(exprs, r.Expr)
			alerts = append(alerts, r.Alert)
		}
	}
	sort.Strings(alerts)
	for _, want := range []string{"RedisAgentCapacityLow", "RedisAgentDown", "RedisAgentOrphans", "RedisInstanceCrashLoop", "RedisInstanceDown", "RedisInstanceHungRestarts"} {
		if i := sort.SearchStrings(alerts, want); i == len(alerts) || alerts[i] != want {
			t.Errorf("no alert %s", want)
		}
	}
	checkRefs(t, "prometheus-rules.yml", exprs, names)

	var dash struct {
		Panels []struct {
			Type    string
			Title   string
			Targets []struct{ Expr string }
		}
		Templating struct {
			List []struct{ Query any }
		}
	}
	b, err = os.ReadFile("../deploy/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	exprs = nil
	for _, p := range dash.Panels {
		if p.Type != "row" && len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	for _, v := range dash.Templating.List {
		if q, ok := v.Query.(string); ok {
			exprs = append(exprs, q)
		}
	}
	checkRefs(t, "grafana-dashboard.json", exprs, names)
}
