package test

import (
	"net/http"
	"syscall"
	"testing"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// TestOpenAPIContract drives every route of the running agent through a
// transport that validates each request and response against
// api/openapi.yaml, so the spec cannot drift from the code.
func TestOpenAPIContract(t *testing.T) {
	testenv.RedisServer(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	flags, env := backupOpts(testenv.StartS3(t), "contract-vm")
	a := runAgent(t, agentOpts{dataDir: dataDir, ports: 4, env: env, extra: append([]string{"--health-interval", "20ms"}, flags...)})
	contract := testenv.NewContract(t, "../api/openapi.yaml", a.base)
	saved := http.DefaultClient.Transport
	http.DefaultClient.Transport = contract
	defer func() { http.DefaultClient.Transport = saved }()

	calls := []struct {
		method, path, body string
		want               int
	}{
		{"GET", "/healthz", "", 200},
		{"GET", "/readyz", "", 200},
		{"GET", "/metrics", "", 200},
		{"GET", "/v1/instances", "", 200},
		{"PUT", "/v1/instances/c1", `{"memory_mb":32,"persistence":"rdb"}`, 201},
		{"PUT", "/v1/instances/c1", `{"memory_mb":32,"persistence":"rdb"}`, 200},
		{"PUT", "/v1/instances/c1", `{"memory_mb":64,"persistence":"rdb"}`, 409},
		{"PUT", "/v1/instances/c2", `{"persistence":"sometimes"}`, 422},
		{"PUT", "/v1/instances/c2", `{"memory_mb":`, 400},
		{"PUT", "/v1/instances/c2", `{"memory_mb":4096}`, 507},     // the whole budget; c1 holds some
		{"PUT", "/v1/instances/c2", `{"memory_mb":99999999}`, 422}, // beyond the whole budget
		{"GET", "/v1/instances/c1", "", 200},
		{"GET", "/v1/instances/none", "", 404},
		{"GET", "/v1/instances", "", 200},
		{"PUT", "/v1/instances/c1/bindings/app", "", 201},
		{"PUT", "/v1/instances/c1/bindings/app", "", 200},
		{"PUT", "/v1/instances/none/bindings/app", "", 404},
		{"PUT", "/v1/instances/c1/bindings/default", "", 422},
		{"GET", "/v1/instances/c1/bindings/app", "", 200},
		{"GET", "/v1/instances/c1/bindings/none", "", 404},
		{"PUT", "/v1/instances/c1/bindings/kept", `{"password":"0123456789abcdef-kept"}`, 201},
		{"PUT", "/v1/instances/c1/bindings/kept", `{"password":"0123456789abcdef-other"}`, 409},
		{"PUT", "/v1/instances/c1/bindings/short", `{"password":"short"}`, 422},
		{"PUT", "/v1/instances/c3", `{"memory_mb":16,"metadata":{"plan":"p1"}}`, 201},
		{"PUT", "/v1/instances/c3", `{"memory_mb":16,"metadata":{"plan":"p1"}}`, 200},
		{"PUT", "/v1/instances/c3", `{"memory_mb":16,"metadata":{"plan":"p2"}}`, 409},
		{"PUT", "/v1/instances/c4", `{"metadata":[1]}`, 422},
		{"PATCH", "/v1/instances/c3", `{"metadata":{"plan":"p2"}}`, 200},
		{"GET", "/v1/instances/c3", "", 200},
		// A move's steps on one agent: started, looked at, refused where a
		// step does not fit, aborted.
		{"POST", "/v1/instances/c3/move", "", 200},
		{"GET", "/v1/instances/c3/replication", "", 200},
		{"POST", "/v1/instances/c3/move/cutover", `{"timeout_ms":0}`, 422},
		{"POST", "/v1/instances/c3/move/forward", `{"host":"127.0.0.1","port":1,"ttl_seconds":60}`, 409},
		{"POST", "/v1/instances/c3/promote", `{"offset":0,"timeout_ms":100}`, 200}, // a primary already: nothing to do
		{"DELETE", "/v1/instances/c3/move", "", 200},
		{"DELETE", "/v1/instances/c3/move", "", 410},
		{"GET", "/v1/instances/none/replication", "", 404},
		{"DELETE", "/v1/instances/c3", "", 200},
		{"POST", "/v1/instances/c1/restart", "", 200},
		{"GET", "/v1/instances/c1/log?lines=5", "", 200},
		{"GET", "/v1/capacity", "", 200},
		{"PUT", "/v1/drain", "", 200},
		{"DELETE", "/v1/drain", "", 200},
		{"GET", "/v1/orphans", "", 200},
		{"PATCH", "/v1/instances/c1", `{"memory_mb":48}`, 200},
		{"PATCH", "/v1/instances/c1", `{"maxmemory_policy":"allkeys-lru","maxmemory_clients":"10%"}`, 200},
		{"PATCH", "/v1/instances/c1", `{"maxmemory_policy":"lru"}`, 422},
		{"PATCH", "/v1/instances/c1", `{"maxmemory_clients":"101%"}`, 422},
		{"PATCH", "/v1/instances/c1", `{"memory_mb":40,"tls":"sometimes"}`, 422}, // nothing changes, the resize neither
		{"PATCH", "/v1/instances/c1", `{"tls":"optional"}`, 200},
		{"GET", "/v1/instances/c1/bindings/app", "", 200}, // with tls_port, tls_uri, ca_cert
		{"PATCH", "/v1/instances/c1", `{"tls":"required"}`, 200},
		{"GET", "/v1/instances/c1", "", 200},
		{"PATCH", "/v1/instances/c1", `{"tls":"off"}`, 200},
		{"PUT", "/v1/instances/c5", `{"memory_mb":16,"tls":"required","maxmemory_policy":"volatile-ttl","maxmemory_clients":"4mb"}`, 201},
		{"PUT", "/v1/instances/c5", `{"memory_mb":16,"tls":"required","maxmemory_policy":"volatile-ttl","maxmemory_clients":"4mb"}`, 200},
		{"PUT", "/v1/instances/c5", `{"memory_mb":16,"tls":"optional","maxmemory_policy":"volatile-ttl","maxmemory_clients":"4mb"}`, 409},
		{"PUT", "/v1/instances/c6", `{"maxmemory_policy":"lru"}`, 422},
		{"DELETE", "/v1/instances/c5", "", 200},
		{"GET", "/v1/ca", "", 200},
		{"PATCH", "/v1/instances/c1", `{"memory_mb":99999999}`, 422}, // beyond the whole budget
		{"PATCH", "/v1/instances/c1", `{}`, 422},
		{"PATCH", "/v1/instances/none", `{"memory_mb":48}`, 404},
		// IO limits: set live, back to the defaults, refused when too low.
		{"PATCH", "/v1/instances/c1", `{"io":{"write_bps":10485760,"read_iops":500,"weight":200}}`, 200},
		{"PATCH", "/v1/instances/c1", `{"io":{}}`, 200},
		{"PATCH", "/v1/instances/c1", `{"io":{"write_bps":1}}`, 422},
		{"PUT", "/v1/instances/c5", `{"memory_mb":16,"persistence":"none","io":{"read_bps":2097152}}`, 201},
		{"PUT", "/v1/instances/c5", `{"memory_mb":16,"persistence":"none","io":{"read_bps":4194304}}`, 409},
		{"DELETE", "/v1/instances/c5", "", 200},
		{"GET", "/v1/instances/none/snapshot", "", 404},
		{"POST", "/v1/instances/c1/backups", "", 201},
		{"POST", "/v1/instances/none/backups", "", 404},
		{"GET", "/v1/instances/c1/backups", "", 200},
		{"GET", "/v1/instances/c1/backups?details=true", "", 200},
		{"GET", "/v1/instances/..x/backups", "", 422},
		{"GET", "/v1/backups", "", 200},
		{"GET", "/v1/backups?agent=contract-vm", "", 200},
		{"PATCH", "/v1/instances/c1", `{"backup":{"schedule":"6h","keep":3}}`, 200},
		{"PATCH", "/v1/instances/c1", `{"backup":{"schedule":"sometimes"}}`, 422},
		{"PATCH", "/v1/instances/c1", `{"backup":{}}`, 200},
		{"PUT", "/v1/instances/c1/snapshot?from_backup=fleet/c1/20200101T000000.000Z.rdb", "", 404},
		{"PUT", "/v1/instances/c1/snapshot", `{"from_backup":"elsewhere/c1/x.rdb"}`, 422},
		{"GET", "/v1/rollout", "", 200},
		{"POST", "/v1/rollout", "", 202},
		{"DELETE", "/v1/instances/c1/bindings/app", "", 200},
		{"DELETE", "/v1/instances/c1/bindings/app", "", 410},
		{"DELETE", "/v1/instances/c1", "", 200},
		{"DELETE", "/v1/instances/c1", "", 410},
	}
	for _, c := range calls {
		if code := a.do(c.method, c.path, c.body, nil); code != c.want {
			t.Errorf("%s %s = %d, want %d", c.method, c.path, code, c.want)
		}
	}
	// A crashlooping instance shows last_exit and log_tail; validate that
	// shape too.
	in := mustProvision(t, a, "c3")
	// Snapshots are not JSON: a download, and uploads of a good and a bad
	// file.
	rdb := a.snapshot("c3")
	if code, body := a.restore("c3", rdb, sha(rdb)); code != 200 {
		t.Errorf("restore = %d %s", code, body)
	}
	if code, body := a.restore("c3", []byte("not an RDB"), ""); code != 422 {
		t.Errorf("restore of junk = %d %s", code, body)
	}
	a.do("GET", "/v1/instances/c3", "", &in)
	syscall.Kill(in.PID, syscall.SIGKILL)
	testenv.Eventually(t, "restart", settle, func() bool {
		var got instance
		a.do("GET", "/v1/instances/c3", "", &got)
		return got.LastExit != nil && got.State == "running"
	})
	a.do("DELETE", "/v1/instances/c3", "", nil)

	contract.CheckCovered(t)
}
