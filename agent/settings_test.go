package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

func ptr[T any](v T) *T { return &v }

// Every policy Redis 7 has, and nothing else; maxmemory_clients in
// Redis's forms; the three TLS modes.
func TestSettingsValidation(t *testing.T) {
	s := &Service{cfg: Config{DefaultMemoryMB: 64, MemoryBudgetMB: 1024}}
	for _, p := range apitype.MaxmemoryPolicies {
		if _, err := s.normalize(Spec{MaxmemoryPolicy: p}); err != nil {
			t.Errorf("policy %s: %v", p, err)
		}
	}
	spec, err := s.normalize(Spec{})
	if err != nil || spec.MaxmemoryPolicy != "noeviction" || spec.MaxmemoryClients != "0" || spec.TLS != "off" {
		t.Fatalf("defaults = %+v, %v; want noeviction, 0, off", spec, err)
	}
	for _, v := range []string{"0", "10%", "100%", "1%", "8mb", "8MB", "1048576", "2gb", "512k"} {
		if _, err := s.normalize(Spec{MaxmemoryClients: v}); err != nil {
			t.Errorf("maxmemory_clients %q: %v", v, err)
		}
	}
	bad := []Spec{
		{MaxmemoryPolicy: "lru"}, {MaxmemoryPolicy: "NOEVICTION"}, {MaxmemoryPolicy: "allkeys-lru "},
		{MaxmemoryClients: "101%"}, {MaxmemoryClients: "-1"}, {MaxmemoryClients: "10 %"}, {MaxmemoryClients: "8tb"}, {MaxmemoryClients: "08mb"},
		{TLS: "on"}, {TLS: "yes"}, {TLS: "Required"},
	}
	for _, b := range bad {
		if _, err := s.normalize(b); !errors.Is(err, ErrInvalid) {
			t.Errorf("normalize(%+v) = %v, want ErrInvalid", b, err)
		}
	}
	for _, set := range []apitype.Settings{{MaxmemoryPolicy: ptr("x")}, {MaxmemoryPolicy: ptr("")}, {MaxmemoryClients: ptr("")}, {TLS: ptr("")}, {TLS: ptr("sometimes")}} {
		if err := CheckSettings(set); !errors.Is(err, ErrInvalid) {
			t.Errorf("CheckSettings(%+v) = %v, want ErrInvalid", set, err)
		}
	}
	if err := CheckSettings(apitype.Settings{MaxmemoryPolicy: ptr("allkeys-lfu"), MaxmemoryClients: ptr("5%"), TLS: ptr("required")}); err != nil {
		t.Fatal(err)
	}
}

// liveConfig reads settings of instance id's running server.
func liveConfig(t *testing.T, s *Service, id string, names ...string) map[string]string {
	t.Helper()
	m, err := s.runtime(id).admin.ConfigGet(context.Background(), names...)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// The eviction policy and the clients' memory bound: chosen at provision,
// changed live by Configure (same process, config file and record
// follow), and what they do: a full noeviction instance refuses writes,
// an allkeys-lru one evicts.
func TestEvictionPolicyLive(t *testing.T) {
	cfg := testConfig(t, 2)
	s := startService(t, cfg)
	ctx := context.Background()
	in, _, err := s.Provision(ctx, "ev", Spec{MemoryMB: 4, Persistence: "none", MaxmemoryClients: "10%"})
	if err != nil {
		t.Fatal(err)
	}
	if in.MaxmemoryPolicy != "noeviction" || in.MaxmemoryClients != "10%" || in.TLS != "off" || in.TLSPort != 0 {
		t.Fatalf("provisioned %+v; want noeviction, 10%%, off", in)
	}
	if m := liveConfig(t, s, "ev", "maxmemory-policy", "maxmemory-clients"); m["maxmemory-policy"] != "noeviction" || m["maxmemory-clients"] != "10%" {
		t.Fatalf("live %v", m)
	}
	creds, _, err := s.Bind(ctx, "ev", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, creds.Port, creds.Username, creds.Password)
	big := strings.Repeat("x", 64<<10)
	fill := func() error {
		for i := range 200 { // 12.5 MiB, three times maxmemory
			if err := c.Set(ctx, "k"+strconv.Itoa(i), big, 0).Err(); err != nil {
				return err
			}
		}
		return nil
	}
	if err := fill(); err == nil || !strings.Contains(err.Error(), "OOM") {
		t.Fatalf("filling a noeviction instance: %v; want OOM", err)
	}
	// Same settings again: accepted, nothing changes.
	if _, err := s.Configure(ctx, "ev", apitype.Settings{MaxmemoryPolicy: ptr("noeviction")}); err != nil {
		t.Fatal(err)
	}
	got, err := s.Configure(ctx, "ev", apitype.Settings{MaxmemoryPolicy: ptr("allkeys-lru"), MaxmemoryClients: ptr("8MB")})
	if err != nil {
		t.Fatal(err)
	}
	if got.MaxmemoryPolicy != "allkeys-lru" || got.MaxmemoryClients != "8mb" || got.PID != in.PID {
		t.Fatalf("after Configure: %+v; want allkeys-lru, 8mb, pid %d", got, in.PID)
	}
	if m := liveConfig(t, s, "ev", "maxmemory-policy", "maxmemory-clients"); m["maxmemory-policy"] != "allkeys-lru" || m["maxmemory-clients"] != strconv.Itoa(8<<20) {
		t.Fatalf("live after Configure: %v", m)
	}
	if err := fill(); err != nil {
		t.Fatalf("filling an allkeys-lru instance: %v", err)
	}
	f, _ := s.runtime("ev").admin.Fields(ctx, "stats")
	if n, _ := strconv.Atoi(f["evicted_keys"]); n == 0 {
		t.Fatal("no key evicted")
	}
	conf, _ := os.ReadFile(s.layout.ConfPath("ev"))
	if !strings.Contains(string(conf), "maxmemory-policy allkeys-lru") || !strings.Contains(string(conf), "maxmemory-clients 8mb") {
		t.Fatalf("config file:\n%s", conf)
	}
	// The record keeps it: a restarted agent, and a restarted server.
	shutdown(t, s, false)
	s = startService(t, cfg)
	if got := mustGet(t, s, "ev"); got.MaxmemoryPolicy != "allkeys-lru" || got.MaxmemoryClients != "8mb" {
		t.Fatalf("after an agent restart: %+v", got)
	}
	if err := s.Restart(ctx, "ev"); err != nil {
		t.Fatal(err)
	}
	if m := liveConfig(t, s, "ev", "maxmemory-policy"); m["maxmemory-policy"] != "allkeys-lru" {
		t.Fatalf("live after a restart: %v", m)
	}
	// A provision of the same id with another policy is another spec.
	if _, _, err := s.Provision(ctx, "ev", Spec{MemoryMB: 4, Persistence: "none", MaxmemoryClients: "10%"}); !errors.Is(err, ErrConflict) {
		t.Fatalf("provision again with the old policy = %v, want ErrConflict", err)
	}
	if _, err := s.Configure(ctx, "ev", apitype.Settings{MaxmemoryPolicy: ptr("lru")}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Configure with an unknown policy = %v, want ErrInvalid", err)
	}
	if _, err := s.Configure(ctx, "none", apitype.Settings{MaxmemoryPolicy: ptr("allkeys-lru")}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Configure of an unknown instance = %v, want ErrNotFound", err)
	}
}

// A policy changed behind the agent's back (a crash between the record
// and the CONFIG SET) is put back by the health check.
func TestPolicyDriftIsRepaired(t *testing.T) {
	cfg := testConfig(t, 1)
	cfg.Health.Interval = 50 * time.Millisecond
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "d", Spec{Persistence: "none", MaxmemoryPolicy: "allkeys-lfu"}); err != nil {
		t.Fatal(err)
	}
	if err := s.runtime("d").admin.SetConfig(ctx, "maxmemory-policy", "noeviction"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "the health check to put the policy back", 5*time.Second, func() bool {
		return liveConfig(t, s, "d", "maxmemory-policy")["maxmemory-policy"] == "allkeys-lfu"
	})
}

// tlsClient is a go-redis client of creds over TLS, from its rediss://
// URI, verifying the server against the CA it carries.
func tlsClient(t *testing.T, creds Credentials) *goredis.Client {
	t.Helper()
	o, err := goredis.ParseURL(creds.TLSURI)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(creds.CACert)) {
		t.Fatal("the credentials' ca_cert holds no certificate")
	}
	o.TLSConfig.RootCAs = pool
	o.MaxRetries, o.DisableIdentity, o.PoolSize = -1, true, 1
	c := goredis.NewClient(o)
	t.Cleanup(func() { c.Close() })
	return c
}

func listens(port int) bool {
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
	if err == nil {
		c.Close()
	}
	return err == nil
}

// TLS off, optional, required and off again on one instance, live: the
// second port comes from the range and goes back to it, the credentials
// follow (tls_port, rediss:// URI, CA), clients verify the certificate
// against the CA, and the agent keeps talking to the server (binds,
// restarts) whichever port is open.
func TestTLSModes(t *testing.T) {
	cfg := testConfig(t, 3)
	s := startService(t, cfg)
	ctx := context.Background()
	in, _, err := s.Provision(ctx, "t", Spec{Persistence: "aof", TLS: "optional"})
	if err != nil {
		t.Fatal(err)
	}
	if in.TLS != "optional" || in.TLSPort == 0 || in.TLSPort == in.Port || in.TLSPort < cfg.PortMin || in.TLSPort > cfg.PortMax {
		t.Fatalf("provisioned %+v; want a TLS port of the range next to the plain one", in)
	}
	if c, _ := s.Capacity(ctx); c.PortsFree != 1 {
		t.Fatalf("ports free = %d, want 1 (two held)", c.PortsFree)
	}
	creds, _, err := s.Bind(ctx, "t", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := s.CA(ctx)
	if creds.TLSPort != in.TLSPort || !strings.HasPrefix(creds.TLSURI, "rediss://app:") || creds.CACert != string(ca) ||
		creds.Port != in.Port || !strings.HasPrefix(creds.URI, "redis://") {
		t.Fatalf("credentials %+v", creds)
	}
	tc := tlsClient(t, creds)
	if err := tc.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("over TLS: %v", err)
	}
	if v, err := client(t, creds.Port, creds.Username, creds.Password).Get(ctx, "k").Result(); err != nil || v != "v" {
		t.Fatalf("plain = %q, %v", v, err)
	}
	// A client that trusts only the system's CAs refuses the certificate.
	o, _ := goredis.ParseURL(creds.TLSURI)
	o.MaxRetries, o.DisableIdentity = -1, true
	strict := goredis.NewClient(o)
	if err := strict.Ping(ctx).Err(); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a client without the CA: %v; want a certificate error", err)
	}
	strict.Close()

	// Required: the plain port closes; credentials are the TLS ones.
	if _, err := s.Configure(ctx, "t", apitype.Settings{TLS: ptr("required")}); err != nil {
		t.Fatal(err)
	}
	if listens(in.Port) {
		t.Fatal("the plain port listens with TLS required")
	}
	creds2, _, err := s.Bind(ctx, "t", "app2", "") // the agent reaches the server
	if err != nil {
		t.Fatal(err)
	}
	if creds2.Port != in.TLSPort || !strings.HasPrefix(creds2.URI, "rediss://") || creds2.URI != creds2.TLSURI {
		t.Fatalf("credentials with TLS required: %+v", creds2)
	}
	if err := tlsClient(t, creds2).Get(ctx, "k").Err(); err != nil {
		t.Fatalf("a new binding over TLS: %v", err)
	}
	if err := tc.Get(ctx, "k").Err(); err != nil {
		t.Fatalf("the TLS connection open across the change: %v", err)
	}
	// A restart: the agent's readiness probe and admin calls go over TLS.
	if err := s.Restart(ctx, "t"); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, s, "t"); got.State != "running" || got.Restarts != 1 {
		t.Fatalf("after a restart with TLS required: %+v", got)
	}
	if err := s.Unbind(ctx, "t", "app2"); err != nil {
		t.Fatal(err)
	}
	// An agent restart adopts it: it listens only on its TLS port.
	shutdown(t, s, false)
	s = startService(t, cfg)
	before := mustGet(t, s, "t").PID
	testenv.Eventually(t, "the adopted server to be running", 5*time.Second, func() bool { return mustGet(t, s, "t").State == "running" })
	if err := s.runtime("t").admin.Ping(ctx); err != nil {
		t.Fatalf("the adopted server over TLS: %v", err)
	}
	if err := tlsClient(t, creds).Get(ctx, "k").Err(); err != nil {
		t.Fatalf("after the agent's restart: %v", err)
	}

	// Off: the TLS port goes back to the range, the plain one reopens.
	got, err := s.Configure(ctx, "t", apitype.Settings{TLS: ptr("off")})
	if err != nil {
		t.Fatal(err)
	}
	if got.TLSPort != 0 || got.PID != before || !listens(in.Port) || listens(in.TLSPort) {
		t.Fatalf("after tls off: %+v; plain listens %v, TLS listens %v", got, listens(in.Port), listens(in.TLSPort))
	}
	if c, _ := s.Capacity(ctx); c.PortsFree != 2 {
		t.Fatalf("ports free after tls off = %d, want 2", c.PortsFree)
	}
	if cr, _ := s.Binding(ctx, "t", "app"); cr.TLSPort != 0 || cr.TLSURI != "" || cr.CACert != "" || cr.Port != in.Port {
		t.Fatalf("credentials after tls off: %+v", cr)
	}
	if ents, _ := os.ReadDir(s.layout.TLSDir("t")); len(ents) != 0 {
		t.Fatalf("tls directory after tls off holds %d files", len(ents))
	}
	// On again, then deleted: both ports are free.
	if _, err := s.Configure(ctx, "t", apitype.Settings{TLS: ptr("optional")}); err != nil {
		t.Fatal(err)
	}
	if err := s.Deprovision(ctx, "t"); err != nil {
		t.Fatal(err)
	}
	if c, _ := s.Capacity(ctx); c.PortsFree != 3 {
		t.Fatalf("ports free after the delete = %d, want 3", c.PortsFree)
	}
}

// TLS takes a second port: without one free, the provision is refused
// (507) and holds nothing.
func TestTLSNeedsASecondPort(t *testing.T) {
	cfg := testConfig(t, 1)
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "t", Spec{Persistence: "none", TLS: "required"}); !errors.Is(err, ErrCapacity) {
		t.Fatalf("TLS with one port in the range = %v, want ErrCapacity", err)
	}
	if _, _, err := s.Provision(ctx, "p", Spec{Persistence: "none"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Configure(ctx, "p", apitype.Settings{TLS: ptr("optional")}); !errors.Is(err, ErrCapacity) {
		t.Fatalf("Configure tls with no port left = %v, want ErrCapacity", err)
	}
	if got := mustGet(t, s, "p"); got.TLS != "off" {
		t.Fatalf("a refused Configure changed the record: %+v", got)
	}
}

// The instance's certificate is renewed before it expires, live: under a
// client that runs GETs in a loop over TLS (a kept connection and new
// ones), no command fails, and new handshakes get the new certificate.
func TestCertRenewalUnderLoad(t *testing.T) {
	cfg := testConfig(t, 2)
	cfg.CertValidity = 6 * time.Second // renewed once under 2 s are left
	cfg.CertCheck = 200 * time.Millisecond
	s := startService(t, cfg)
	ctx := context.Background()
	in, _, err := s.Provision(ctx, "r", Spec{Persistence: "none", TLS: "required"})
	if err != nil {
		t.Fatal(err)
	}
	creds, _, err := s.Bind(ctx, "r", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(creds.CACert))
	serial := func() string {
		c, err := tls.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(creds.TLSPort)), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
		if err != nil {
			t.Errorf("handshake: %v", err)
			return ""
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	first := serial()
	kept := tlsClient(t, creds)
	kept.Set(ctx, "k", "v", 0)
	var ops, fails atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			c := kept
			if i%10 == 0 {
				c = tlsClient(t, creds) // a new connection, a new handshake
			}
			if err := c.Get(ctx, "k").Err(); err != nil {
				fails.Add(1)
				t.Errorf("GET %d: %v", i, err)
			}
			if c != kept {
				c.Close()
			}
			ops.Add(1)
			time.Sleep(2 * time.Millisecond)
		}
	}()
	seen := map[string]bool{first: true}
	testenv.Eventually(t, "two renewals", 20*time.Second, func() bool {
		seen[serial()] = true
		return len(seen) >= 3
	})
	close(stop)
	<-done
	if fails.Load() != 0 {
		t.Fatalf("%d of %d GETs failed across the renewals", fails.Load(), ops.Load())
	}
	got := mustGet(t, s, "r")
	if got.PID != in.PID || got.Restarts != 0 {
		t.Fatalf("a renewal restarted the server: %+v", got)
	}
	if ents, _ := os.ReadDir(s.layout.TLSDir("r")); len(ents) != 3 {
		t.Fatalf("tls directory holds %d files, want the CA, the current certificate and key", len(ents))
	}
	t.Logf("%d GETs over TLS across %d certificates, none failed", ops.Load(), len(seen))
}

// The agent's CA: made at the first start, kept across restarts; the
// operator's when given.
func TestAgentCA(t *testing.T) {
	cfg := testConfig(t, 1)
	s := startService(t, cfg)
	ca1, _ := s.CA(context.Background())
	shutdown(t, s, false)
	s = startService(t, cfg)
	ca2, _ := s.CA(context.Background())
	if string(ca1) != string(ca2) || !strings.HasPrefix(string(ca1), "-----BEGIN CERTIFICATE-----") {
		t.Fatal("the agent's CA changed across a restart")
	}
	if st, err := os.Stat(cfg.DataDir + "/tls/ca.key"); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("CA key: %v %v", st, err)
	}
	shutdown(t, s, false)
	// The operator's CA: here, the first agent's files.
	cfg2 := testConfig(t, 1)
	cfg2.InstanceCACert, cfg2.InstanceCAKey = cfg.DataDir+"/tls/ca.crt", cfg.DataDir+"/tls/ca.key"
	s2 := startService(t, cfg2)
	if ca3, _ := s2.CA(context.Background()); string(ca3) != string(ca1) {
		t.Fatal("--instance-ca-cert is not the CA served")
	}
	if _, err := os.Stat(cfg2.DataDir + "/tls/ca.key"); err == nil {
		t.Fatal("the agent made a CA of its own although it was given one")
	}
	cfg3 := testConfig(t, 1)
	cfg3.InstanceCACert = cfg2.InstanceCACert
	if _, err := New(cfg3); err == nil {
		t.Fatal("a CA certificate without its key was accepted")
	}
}

// The operator gives the agent another CA: at its next start every TLS
// certificate is issued anew from it and the running servers switch to
// it live. The agent still reaches a server that requires TLS and
// presents the old CA's certificate (it knows the key), so nothing is
// restarted.
func TestCAChangeRenewsLive(t *testing.T) {
	cfg := testConfig(t, 2)
	s := startService(t, cfg)
	ctx := context.Background()
	in, _, err := s.Provision(ctx, "c", Spec{Persistence: "aof", TLS: "required"})
	if err != nil {
		t.Fatal(err)
	}
	before, _, err := s.Bind(ctx, "c", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	shutdown(t, s, false)
	other := testConfig(t, 1) // an agent whose CA becomes this one's
	o, err := New(other)
	if err != nil {
		t.Fatal(err)
	}
	o.Close()
	cfg.InstanceCACert, cfg.InstanceCAKey = other.DataDir+"/tls/ca.crt", other.DataDir+"/tls/ca.key"
	s = startService(t, cfg)
	after, err := s.Binding(ctx, "c", "app")
	if err != nil {
		t.Fatal(err)
	}
	if after.CACert == before.CACert {
		t.Fatal("the credentials carry the old CA")
	}
	testenv.Eventually(t, "the server to present the new CA's certificate", 10*time.Second, func() bool {
		c := tlsClient(t, after)
		defer c.Close()
		return c.Ping(ctx).Err() == nil
	})
	if got := mustGet(t, s, "c"); got.PID != in.PID || got.Restarts != 0 {
		t.Fatalf("the CA change restarted the server: %+v", got)
	}
	if err := s.runtime("c").admin.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}

// The certificate's expiry is a metric (an alert's, should renewals
// fail), and an instance with TLS counts two allocated ports.
func TestCertExpiryMetric(t *testing.T) {
	cfg := testConfig(t, 3)
	reg := prometheus.NewPedanticRegistry()
	cfg.Registerer = reg
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "x", Spec{Persistence: "none", TLS: "optional"}); err != nil {
		t.Fatal(err)
	}
	exp, ok := gauge(t, reg, "redis_agent_instance_tls_cert_expiry_timestamp_seconds", "x")
	if want := float64(time.Now().Add(90 * 24 * time.Hour).Unix()); !ok || exp < want-60 || exp > want+60 {
		t.Fatalf("certificate expiry = %v (present %v), want about %v", exp, ok, want)
	}
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "redis_agent_ports_allocated" && mf.GetMetric()[0].GetGauge().GetValue() != 2 {
			t.Fatalf("ports allocated = %v, want 2", mf.GetMetric()[0].GetGauge().GetValue())
		}
	}
	if _, err := s.Configure(ctx, "x", apitype.Settings{TLS: ptr("off")}); err != nil {
		t.Fatal(err)
	}
	if _, ok := gauge(t, reg, "redis_agent_instance_tls_cert_expiry_timestamp_seconds", "x"); ok {
		t.Fatal("an expiry without TLS")
	}
	problems, err := testutil.GatherAndLint(reg)
	if err != nil || len(problems) != 0 {
		t.Fatalf("promlint: %v %+v", err, problems)
	}
}
