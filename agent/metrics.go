package agent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/backup"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
)

// metrics are the agent's own figures. Event counters and histograms are
// updated as things happen; everything else is read at scrape time from
// memory (supervisor status, the last reconcile) by collector, without
// I/O to any instance.
type metrics struct {
	restarts        *prometheus.CounterVec
	opDuration      *prometheus.HistogramVec
	reconcileSecs   prometheus.Gauge
	reconcileCounts *prometheus.GaugeVec
	backupFailures  *prometheus.CounterVec
	// backups is set when the agent has a backup target: track creates
	// the failure series then.
	backups bool
}

func newMetrics(reg prometheus.Registerer, s *Service) *metrics {
	m := &metrics{
		restarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "redis_agent_instance_restarts_total",
			Help: "Restarts of instances' redis-server processes, by instance and reason (crash, hung, unready, manual, oom, spawn_failed).",
		}, []string{"instance", "reason"}),
		opDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "redis_agent_operation_duration_seconds",
			Help:    "Duration of successful provision, deprovision and restart operations.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"operation"}),
		reconcileSecs: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "redis_agent_reconcile_duration_seconds",
			Help: "Duration of the last reconcile at start.",
		}),
		reconcileCounts: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "redis_agent_reconcile_instances",
			Help: "What the last reconcile did, by outcome (adopted, started, deleted).",
		}, []string{"outcome"}),
		backupFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "redis_agent_backup_failures_total",
			Help: "Failed backups, by instance and reason (unreachable, denied, full, no_bucket, timeout, snapshot, storage, other).",
		}, []string{"instance", "reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.restarts, m.opDuration, m.reconcileSecs, m.reconcileCounts, m.backupFailures, &collector{s: s})
	}
	return m
}

func (m *metrics) observe(op string, start time.Time) {
	m.opDuration.WithLabelValues(op).Observe(time.Since(start).Seconds())
}

// restartReasons are the values of the restarts metric's reason label:
// every exit reason but stopped (a delete, not a restart).
var restartReasons = []string{apitype.ReasonCrash, apitype.ReasonHung, apitype.ReasonUnready, apitype.ReasonManual, apitype.ReasonOOM, apitype.ReasonSpawnFailed}

// track creates the per-instance event series of id at 0, when it is
// provisioned or adopted. A counter that first appears at its first
// increment makes increase() over it miss that event: alerts on the first
// hung kill would never fire. Idempotent: existing series keep their value.
func (m *metrics) track(id string) {
	for _, r := range restartReasons {
		m.restarts.WithLabelValues(id, r)
	}
	if m.backups {
		for _, r := range backup.Reasons {
			m.backupFailures.WithLabelValues(id, r)
		}
	}
}

// forget drops the per-instance series of a deleted instance: each by
// its labels (every reason is one of the lists track made them of; a
// DeletePartialMatch goes through every series of every instance, which
// at a thousand made each delete a scan of ten thousand).
func (m *metrics) forget(id string) {
	for _, r := range restartReasons {
		m.restarts.DeleteLabelValues(id, r)
	}
	for _, r := range backup.Reasons {
		m.backupFailures.DeleteLabelValues(id, r)
	}
}

var (
	descInstances = prometheus.NewDesc("redis_agent_instances",
		"Instances by state.", []string{"state"}, nil)
	descOrphans = prometheus.NewDesc("redis_agent_orphans",
		"Directories and redis-server processes under the data root that no record owns, found by the last reconcile.", nil, nil)
	descPortsTotal = prometheus.NewDesc("redis_agent_ports_in_range",
		"Ports in the configured range.", nil, nil)
	descPortsAllocated = prometheus.NewDesc("redis_agent_ports_allocated",
		"Ports held by instance records.", nil, nil)
	descMemoryTotal = prometheus.NewDesc("redis_agent_memory_budget_bytes",
		"Memory budget the agent hands out as maxmemory.", nil, nil)
	descMemoryReserved = prometheus.NewDesc("redis_agent_memory_reserved_bytes",
		"Memory budget reserved by instances.", nil, nil)
	descDiskFree = prometheus.NewDesc("redis_agent_disk_free_bytes",
		"Free bytes an unprivileged user may write on the data directory's file system.", nil, nil)
	descDiskTotal = prometheus.NewDesc("redis_agent_disk_total_bytes",
		"Size of the data directory's file system.", nil, nil)
	descDiskReservedAll = prometheus.NewDesc("redis_agent_disk_reserved_bytes",
		"Disk the instances' reservations add up to (each one's files' worst case for its maxmemory and persistence, and its logs).", nil, nil)
	descDiskAvailable = prometheus.NewDesc("redis_agent_disk_available_bytes",
		"Free disk less what the instances may still grow into and the headroom: the largest reservation a new instance can get.", nil, nil)
)

// Per-instance figures, named and meant as oliver006/redis_exporter's so
// its dashboards carry over, labelled instance="<id>". They come from the
// INFO each health check caches.
func instanceDesc(name, help string, extra ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, append([]string{"instance"}, extra...), nil)
}

var (
	descUp             = instanceDesc("redis_up", "1 when the instance runs and its last health check succeeded.")
	descUptime         = instanceDesc("redis_uptime_in_seconds", "Seconds since the redis-server process started (INFO uptime_in_seconds).")
	descMemUsed        = instanceDesc("redis_memory_used_bytes", "Memory allocated by Redis (INFO used_memory).")
	descMemMax         = instanceDesc("redis_memory_max_bytes", "maxmemory of the instance.")
	descClients        = instanceDesc("redis_connected_clients", "Client connections (INFO connected_clients).")
	descBlocked        = instanceDesc("redis_blocked_clients", "Clients blocked in a blocking call (INFO blocked_clients).")
	descCommands       = instanceDesc("redis_commands_processed_total", "Commands processed (INFO total_commands_processed).")
	descHits           = instanceDesc("redis_keyspace_hits_total", "Successful key lookups (INFO keyspace_hits).")
	descMisses         = instanceDesc("redis_keyspace_misses_total", "Failed key lookups (INFO keyspace_misses).")
	descEvicted        = instanceDesc("redis_evicted_keys_total", "Keys evicted for maxmemory (INFO evicted_keys).")
	descExpired        = instanceDesc("redis_expired_keys_total", "Keys expired (INFO expired_keys).")
	descDBKeys         = instanceDesc("redis_db_keys", "Keys per database.", "db")
	descBgsaveOK       = instanceDesc("redis_rdb_last_bgsave_status", "1 when the last RDB save succeeded.")
	descAOFWriteOK     = instanceDesc("redis_aof_last_write_status", "1 when the last AOF write succeeded.")
	descProcRSS        = instanceDesc("redis_agent_instance_resident_memory_bytes", "Resident memory of the instance's redis-server process (/proc).")
	descProcCPU        = instanceDesc("redis_agent_instance_cpu_seconds_total", "User and system CPU time of the instance's current redis-server process (/proc).")
	descInstanceStates = instanceDesc("redis_agent_instance_state", "1 for the state the instance is in.", "state")
	descCertExpiry     = instanceDesc("redis_agent_instance_tls_cert_expiry_timestamp_seconds", "When the instance's TLS certificate expires (Unix time); it is renewed live once a third of its validity is left.")
	descBackupLastTime = instanceDesc("redis_agent_backup_last_success_timestamp_seconds", "Start time (Unix seconds) of the instance's last successful backup on this agent.")
	descBackupLastSize = instanceDesc("redis_agent_backup_last_success_bytes", "Size of the instance's last successful backup.")
	descBackupInterval = instanceDesc("redis_agent_backup_interval_seconds", "The period of the instance's backup schedule; absent when it has none (off).")
	descBackupRunning  = prometheus.NewDesc("redis_agent_backups_running", "Backups in progress.", nil, nil)
	descTransient      = prometheus.NewDesc("redis_agent_memory_transient_bytes", "Memory budget held for now by backups' BGSAVE forks and restores' candidates.", nil, nil)
	descDisk           = instanceDesc("redis_agent_instance_disk_bytes", "Disk the instance's files take (allocated bytes, as du counts them), by kind: data (its directory: RDB, AOF, config) and log (its log and the rotated ones); measured every --disk-interval.", "kind")
	descDiskReserved   = instanceDesc("redis_agent_instance_disk_reserved_bytes", "What the instance's files may take, by kind: data (its directory: the worst case of its files for its maxmemory and persistence) and log (--log-max-size x (--log-keep + 1)); the disk budget counts the log part when the logs are on the data file system.", "kind")
	descDiskQuota      = instanceDesc("redis_agent_instance_disk_quota_bytes", "The project quota on the instance's data directory, where the file system enforces one.")
)

// collector reads the agent's state at scrape time.
type collector struct{ s *Service }

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descInstances, descOrphans, descPortsTotal, descPortsAllocated, descMemoryTotal, descMemoryReserved,
		descUp, descUptime, descMemUsed, descMemMax, descClients, descBlocked, descCommands, descHits, descMisses,
		descEvicted, descExpired, descDBKeys, descBgsaveOK, descAOFWriteOK, descProcRSS, descProcCPU, descInstanceStates, descCertExpiry,
		descBackupLastTime, descBackupLastSize, descBackupInterval, descBackupRunning, descTransient,
		descDisk, descDiskReserved, descDiskQuota, descDiskFree, descDiskTotal, descDiskReservedAll, descDiskAvailable} {
		ch <- d
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// collectInstance emits the figures of one instance from its cached stats.
func collectInstance(ch chan<- prometheus.Metric, id string, in *instance) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append([]string{id}, labels...)...)
	}
	counter := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, id)
	}
	status := in.sup.Status()
	state := status.State
	gauge(descInstanceStates, 1, state.String())
	st := in.current(status)
	gauge(descUp, b2f(state == supervisor.Running && st != nil && st.ok))
	if st == nil || !st.ok {
		return
	}
	i := st.info
	gauge(descUptime, i.UptimeSeconds)
	gauge(descMemUsed, i.UsedMemory)
	gauge(descMemMax, i.MaxMemory)
	gauge(descClients, i.ConnectedClients)
	gauge(descBlocked, i.BlockedClients)
	counter(descCommands, i.CommandsProcessed)
	counter(descHits, i.KeyspaceHits)
	counter(descMisses, i.KeyspaceMisses)
	counter(descEvicted, i.EvictedKeys)
	counter(descExpired, i.ExpiredKeys)
	for db, n := range i.DBKeys {
		gauge(descDBKeys, n, db)
	}
	gauge(descBgsaveOK, b2f(i.RDBLastBgsaveOK))
	gauge(descAOFWriteOK, b2f(i.AOFLastWriteOK))
	gauge(descProcRSS, st.rss)
	counter(descProcCPU, st.cpu)
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	counts := map[string]float64{}
	for st := supervisor.Starting; st <= supervisor.Stopped; st++ {
		counts[st.String()] = 0
	}
	// Copy under the lock; emit without it (the registry may block on ch).
	s.mu.Lock()
	insts := make(map[string]*instance, len(s.instances))
	for id, in := range s.instances {
		insts[id] = in
	}
	s.mu.Unlock()
	for id, in := range insts {
		counts[in.sup.Status().State.String()]++
		collectInstance(ch, id, in)
		if t, ok := s.certExpiry.Load(id); ok {
			ch <- prometheus.MustNewConstMetric(descCertExpiry, prometheus.GaugeValue, float64(t.(int64)), id)
		}
	}
	for st, n := range counts {
		ch <- prometheus.MustNewConstMetric(descInstances, prometheus.GaugeValue, n, st)
	}
	var orphans int
	if p := s.orphans.Load(); p != nil {
		orphans = len(*p)
	}
	ch <- prometheus.MustNewConstMetric(descOrphans, prometheus.GaugeValue, float64(orphans))
	ch <- prometheus.MustNewConstMetric(descPortsTotal, prometheus.GaugeValue, float64(s.cfg.PortMax-s.cfg.PortMin+1))
	ch <- prometheus.MustNewConstMetric(descMemoryTotal, prometheus.GaugeValue, float64(s.cfg.MemoryBudgetMB)*(1<<20))
	if u, err := s.store.Usage(); err == nil {
		held := 0 // an instance with TLS holds two
		for p := s.cfg.PortMin; p <= s.cfg.PortMax; p++ {
			if u.PortHeld(p) {
				held++
			}
		}
		ch <- prometheus.MustNewConstMetric(descPortsAllocated, prometheus.GaugeValue, float64(held))
		ch <- prometheus.MustNewConstMetric(descMemoryReserved, prometheus.GaugeValue, float64(u.MemoryMB)*(1<<20))
	}
	ch <- prometheus.MustNewConstMetric(descTransient, prometheus.GaugeValue, float64(s.transientMB.Load())*(1<<20))
	if s.bk != nil {
		s.collectBackups(ch, insts)
	}
	c.collectDisk(ch)
}

// collectBackups emits the backup figures of the supervised instances
// from their records.
func (s *Service) collectBackups(ch chan<- prometheus.Metric, insts map[string]*instance) {
	recs, err := s.store.List()
	if err != nil {
		return
	}
	for _, rec := range recs {
		if insts[rec.ID] == nil || rec.Phase != state.PhaseActive {
			continue
		}
		if lb := rec.LastBackup; lb != nil {
			ch <- prometheus.MustNewConstMetric(descBackupLastTime, prometheus.GaugeValue, float64(lb.Time.UnixNano())/1e9, rec.ID)
			ch <- prometheus.MustNewConstMetric(descBackupLastSize, prometheus.GaugeValue, float64(lb.Size), rec.ID)
		}
		if p := s.policyOf(rec); !p.sched.Off {
			ch <- prometheus.MustNewConstMetric(descBackupInterval, prometheus.GaugeValue, p.sched.Every.Seconds(), rec.ID)
		}
	}
	s.bk.mu.Lock()
	n := len(s.bk.running)
	s.bk.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(descBackupRunning, prometheus.GaugeValue, float64(n))
}

// collectDisk emits the disk figures: every instance's from its last
// measure (no file is walked, no record read at a scrape), and the data
// file system's budget over them (one statfs).
func (c *collector) collectDisk(ch chan<- prometheus.Metric) {
	s := c.s
	usage := s.disk.all()
	shares := make([]diskUsage, 0, len(usage))
	for id, u := range usage {
		ch <- prometheus.MustNewConstMetric(descDisk, prometheus.GaugeValue, float64(u.data), id, "data")
		ch <- prometheus.MustNewConstMetric(descDisk, prometheus.GaugeValue, float64(u.log), id, "log")
		ch <- prometheus.MustNewConstMetric(descDiskReserved, prometheus.GaugeValue, float64(u.reservedData), id, "data")
		ch <- prometheus.MustNewConstMetric(descDiskReserved, prometheus.GaugeValue, float64(s.logBound()), id, "log")
		if u.quota > 0 {
			ch <- prometheus.MustNewConstMetric(descDiskQuota, prometheus.GaugeValue, float64(u.quota), id)
		}
		shares = append(shares, u)
	}
	if b, err := s.budgetOf(shares); err == nil {
		ch <- prometheus.MustNewConstMetric(descDiskTotal, prometheus.GaugeValue, float64(b.total))
		ch <- prometheus.MustNewConstMetric(descDiskFree, prometheus.GaugeValue, float64(b.free))
		ch <- prometheus.MustNewConstMetric(descDiskReservedAll, prometheus.GaugeValue, float64(b.reserved))
		ch <- prometheus.MustNewConstMetric(descDiskAvailable, prometheus.GaugeValue, float64(b.available))
	}
}
