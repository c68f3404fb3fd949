package test

import (
	"context"
	"crypto/rand"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// duOf is what du(1) says the paths take, in bytes.
func duOf(t *testing.T, paths ...string) int64 {
	t.Helper()
	var total int64
	for _, p := range paths {
		out, err := exec.Command("du", "-s", "-B1", p).Output()
		if err != nil {
			t.Fatalf("du %s: %v", p, err)
		}
		n, _ := strconv.ParseInt(strings.Fields(string(out))[0], 10, 64)
		total += n
	}
	return total
}

// The running agent measures every instance's files in the background:
// its view, the status table and /metrics show what they take, which is
// what du says within the reservation's rounding (1 MiB for the
// instance's directory); /v1/capacity sums them.
func TestDiskUsage(t *testing.T) {
	testenv.RedisServer(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	a := runAgent(t, agentOpts{dataDir: dataDir, extra: []string{"--disk-interval", "100ms"}})
	mustProvision(t, a, "du")
	c := redisClient(t, mustBind(t, a, "du", "app"))
	val := make([]byte, 64<<10)
	for i := range 64 { // 4 MiB, fsynced at each write (aof-always)
		rand.Read(val)
		if err := c.Set(context.Background(), "k"+strconv.Itoa(i), val, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	var in instance
	testenv.Eventually(t, "the 4 MiB written in the instance's disk figures", settle, func() bool {
		a.do("GET", "/v1/instances/du", "", &in)
		return in.Disk != nil && in.Disk.DataBytes >= 4<<20
	})
	dir := filepath.Join(dataDir, "instances", "du")
	log := filepath.Join(dataDir, "logs", "du.log")
	data, logBytes := duOf(t, dir), duOf(t, log)
	t.Logf("disk %+v; du: data %d, log %d", *in.Disk, data, logBytes)
	if d := in.Disk.DataBytes - data; d > 1<<20 || d < -(1<<20) {
		t.Errorf("data_bytes %d, du says %d", in.Disk.DataBytes, data)
	}
	if d := in.Disk.LogBytes - logBytes; d > 1<<20 || d < -(1<<20) {
		t.Errorf("log_bytes %d, du says %d", in.Disk.LogBytes, logBytes)
	}
	// 3 x 32 MiB + 64 MiB for an AOF, its directory's MiB, its logs' 8.
	if in.Disk.ReservedBytes != (3*32+64+1+8)<<20 {
		t.Errorf("reserved_bytes %d", in.Disk.ReservedBytes)
	}
	var capa apitype.Capacity
	a.do("GET", "/v1/capacity", "", &capa)
	if capa.DiskReservedBytes != in.Disk.ReservedBytes || capa.DiskUsedBytes < in.Disk.DataBytes || capa.DiskFreeBytes <= 0 ||
		capa.DiskAvailableBytes > capa.DiskFreeBytes || capa.DiskTotalBytes < capa.DiskFreeBytes {
		t.Errorf("capacity %+v", capa)
	}
	resp, err := http.Get(a.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`redis_agent_instance_disk_bytes{instance="du",kind="data"} `, `redis_agent_instance_disk_bytes{instance="du",kind="log"} `,
		`redis_agent_instance_disk_reserved_bytes{instance="du",kind="data"} 1.68820736e+08`, `redis_agent_instance_disk_reserved_bytes{instance="du",kind="log"} 8.388608e+06`, "redis_agent_disk_free_bytes ", "redis_agent_disk_available_bytes "} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	out, err := exec.Command(agentBin, "status", "--addr", strings.TrimPrefix(a.base, "http://")).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "/169.0MiB") {
		t.Errorf("status: %v\n%s", err, out)
	}
	a.do("DELETE", "/v1/instances/du", "", nil)
}

// A provision whose disk reservation does not fit is a 507, before
// anything is made; /v1/capacity says there is no room.
func TestDiskBudgetFull(t *testing.T) {
	testenv.RedisServer(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	a := runAgent(t, agentOpts{dataDir: dataDir, extra: []string{"--disk-headroom-mb", "1000000000"}})
	var e apitype.Error
	if code := a.do("PUT", "/v1/instances/nofit", `{"memory_mb":16,"persistence":"none"}`, &e); code != 507 || e.Code != apitype.CodeInsufficientCapacity || !strings.Contains(e.Description, "disk") {
		t.Fatalf("provision with no disk budget = %d %+v, want 507", code, e)
	}
	if code := a.do("GET", "/v1/instances/nofit", "", nil); code != 404 {
		t.Fatalf("the refused instance exists: %d", code)
	}
	var capa apitype.Capacity
	a.do("GET", "/v1/capacity", "", &capa)
	if capa.DiskAvailableBytes != 0 || capa.DiskFreeBytes <= 0 {
		t.Fatalf("capacity %+v", capa)
	}
}
