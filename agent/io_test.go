package agent

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/limits"
)

func i64(v int64) *int64 { return &v }

// The agent's defaults fill in what an instance's setting does not set;
// a setting's values are checked.
func TestIOSetting(t *testing.T) {
	s := &Service{cfg: Config{IOWriteBPS: 8 << 20, IOReadIOPS: 300}, dev: limits.Device{ID: "8:0", Name: "sda", Scheduler: "mq-deadline"}}
	got := s.ioFor(&apitype.IOSetting{WriteBPS: i64(0), ReadBPS: i64(2 << 20)})
	if want := (limits.IO{Device: "8:0", ReadBPS: 2 << 20, ReadIOPS: 300}); got != want {
		t.Errorf("ioFor = %+v, want %+v", got, want)
	}
	if got := s.ioFor(nil); got != (limits.IO{Device: "8:0", WriteBPS: 8 << 20, ReadIOPS: 300}) {
		t.Errorf("ioFor(nil) = %+v", got)
	}
	v := s.ioView(&apitype.IOSetting{Weight: i64(500)})
	if v.Device != "8:0" || v.WriteBPS != 8<<20 || v.Weight != 500 || !strings.Contains(v.Note, "only BFQ") {
		t.Errorf("ioView = %+v", v)
	}
	// No device: nothing is set, and the view says why.
	s.dev, s.ioNote = limits.Device{}, "IO limits are not enforced: tmpfs"
	if got := s.ioFor(nil); got != (limits.IO{}) {
		t.Errorf("ioFor without a device = %+v", got)
	}
	if v := s.ioView(nil); v.Note != s.ioNote || v.Device != "" {
		t.Errorf("ioView without a device = %+v", v)
	}
	for _, bad := range []apitype.IOSetting{
		{ReadBPS: i64(-1)}, {WriteBPS: i64(1000)}, {ReadIOPS: i64(5)}, {Weight: i64(1001)}, {Weight: i64(-1)},
	} {
		if err := CheckIO(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("CheckIO(%+v) = %v, want ErrInvalid", bad, err)
		}
	}
	if n, err := normalizeIO(&apitype.IOSetting{}); n != nil || err != nil {
		t.Errorf("an empty setting normalizes to %+v, %v; want nil", n, err)
	}
	if !sameIO(nil, nil) || sameIO(nil, &apitype.IOSetting{ReadBPS: i64(0)}) || !sameIO(&apitype.IOSetting{ReadBPS: i64(1 << 20)}, &apitype.IOSetting{ReadBPS: i64(1 << 20)}) {
		t.Error("sameIO is wrong")
	}
	bad := Config{IOWriteBPS: 10}
	if err := bad.Validate(); err == nil || !strings.Contains(err.Error(), "write_bps") {
		t.Errorf("Validate of a 10 B/s default: %v", err)
	}
}

// A provision's IO setting is part of its identity, shown in its view,
// and PATCHed live.
func TestIOProvisionAndSet(t *testing.T) {
	cfg := testConfig(t, 3)
	cfg.IOReadIOPS = 1000
	s := startService(t, cfg)
	ctx := context.Background()
	spec := Spec{MemoryMB: 16, Persistence: "none", IO: &apitype.IOSetting{WriteBPS: i64(16 << 20)}}
	inst, _, err := s.Provision(ctx, "io1", spec)
	if err != nil {
		t.Fatal(err)
	}
	if inst.IO == nil || inst.IO.WriteBPS != 16<<20 || inst.IO.ReadIOPS != 1000 || inst.IO.Setting == nil {
		t.Fatalf("IO of the view = %+v", inst.IO)
	}
	if s.dev.ID != "" && inst.IO.Device != s.dev.ID {
		t.Errorf("device %q, the data directory's is %q", inst.IO.Device, s.dev.ID)
	}
	if _, created, err := s.Provision(ctx, "io1", spec); err != nil || created {
		t.Fatalf("the same provision again = %v, %v", created, err)
	}
	other := spec
	other.IO = &apitype.IOSetting{WriteBPS: i64(32 << 20)}
	if _, _, err := s.Provision(ctx, "io1", other); !errors.Is(err, ErrConflict) {
		t.Fatalf("another IO setting for the same id = %v, want ErrConflict", err)
	}
	if _, _, err := s.Provision(ctx, "io2", Spec{IO: &apitype.IOSetting{ReadIOPS: i64(1)}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("1 IOPS = %v, want ErrInvalid", err)
	}
	inst, err = s.SetIO(ctx, "io1", apitype.IOSetting{ReadIOPS: i64(0)})
	if err != nil || inst.IO.WriteBPS != 0 || inst.IO.ReadIOPS != 0 {
		t.Fatalf("SetIO = %+v, %v", inst.IO, err)
	}
	if rec, _ := s.store.Get("io1"); rec.IO == nil || rec.IO.ReadIOPS == nil || rec.IO.WriteBPS != nil {
		t.Fatalf("record's IO = %+v", rec.IO)
	}
	if _, err := s.SetIO(ctx, "nosuch", apitype.IOSetting{}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetIO of an absent instance = %v", err)
	}
	if cgroupsOn(s) && s.ioNote == "" {
		rec, _ := s.store.Get("io1")
		if d, err := s.cg.Differs("io1", s.limitsFor(16, "none", rec.IO)); err != nil || d {
			t.Fatalf("the cgroup's limits after SetIO differ from the record's: %v, %v", d, err)
		}
	}
}

// A throttled instance's writes are throttled: a BGSAVE of 8 MiB that
// cannot be compressed, at 2 MiB/s, takes about 4 s; once the limit is
// lifted live (PATCH), the same BGSAVE takes a fraction of that. Needs
// root, an IO controller and a block device under the test's data
// directory.
func TestIOThrottlesBGSAVE(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("cgroups need root")
	}
	cfg := testConfig(t, 1)
	s := startService(t, cfg)
	if !cgroupsOn(s) || s.ioNote != "" {
		t.Skipf("no IO limits here: cgroups %v, %s", cgroupsOn(s), s.ioNote)
	}
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "thr", Spec{MemoryMB: 64, Persistence: "rdb", IO: &apitype.IOSetting{WriteBPS: i64(2 << 20)}}); err != nil {
		t.Fatal(err)
	}
	cr, _, err := s.Bind(ctx, "thr", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, cr.Port, cr.Username, cr.Password)
	val := make([]byte, 64<<10)
	for i := range 128 { // 8 MiB of random values: LZF cannot shrink them
		rand.Read(val)
		if err := c.Set(ctx, "k"+strconv.Itoa(i), val, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	snap := func() time.Duration {
		t.Helper()
		// A BGSAVE to the instance's disk (a snapshot out no longer
		// writes one: it is sent as to a replica).
		start := time.Now()
		if err := s.runtime("thr").admin.Save(ctx); err != nil {
			t.Fatal(err)
		}
		d := time.Since(start)
		if st, err := os.Stat(filepath.Join(s.layout.DataDir("thr"), rdbName)); err != nil || st.Size() < 8<<20 {
			t.Fatalf("the BGSAVE's RDB: %v, %v", st, err)
		}
		return d
	}
	throttled := snap()
	if _, err := s.SetIO(ctx, "thr", apitype.IOSetting{}); err != nil {
		t.Fatal(err)
	}
	free := snap()
	t.Logf("BGSAVE of 8 MiB: %v at 2 MiB/s, %v without a limit", throttled, free)
	if throttled < 2500*time.Millisecond {
		t.Errorf("BGSAVE of 8 MiB at a 2 MiB/s write limit took %v: not throttled", throttled)
	}
	if free > throttled/2 {
		t.Errorf("BGSAVE without the limit took %v, %v with it: the limit was not lifted live", free, throttled)
	}
}
