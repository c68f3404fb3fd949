package test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// A scrape of the running agent is lint-clean and carries its figures.
func TestMetricsScrape(t *testing.T) {
	testenv.RedisServer(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	a := runAgent(t, agentOpts{dataDir: dataDir})
	mustProvision(t, a, "scraped")
	resp, err := http.Get(a.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("/metrics = %d", resp.StatusCode)
	}
	var body strings.Builder
	problems, err := promlint.New(teeReader(resp.Body, &body)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	if len(problems) != 0 {
		t.Fatalf("promlint: %+v", problems)
	}
	for _, want := range []string{
		`redis_agent_instances{state="running"} 1`,
		`redis_agent_http_requests_total{code="201",method="PUT",route="/v1/instances/{id}"} 1`,
		`redis_agent_operation_duration_seconds_count{operation="provision"} 1`,
		"go_build_info", "process_resident_memory_bytes",
	} {
		if !strings.Contains(body.String(), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	a.do("DELETE", "/v1/instances/scraped", "", nil)
}
